# The tpqueue image: the `tpq` command with torch from PyPI (its Linux x86_64 wheels bundle the CUDA
# runtime; the host needs the NVIDIA driver and the NVIDIA container toolkit). docker-compose.yml builds it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/tpqueue
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY router ./router
COPY gpu_worker ./gpu_worker
RUN pip install '.[worker]' \
    && useradd --create-home --uid 1000 tpq \
    && mkdir -p /cache /data \
    && chown tpq /cache /data

USER tpq
# Models are fetched and converted into /cache once (a volume); /data is the embedded Redis' (unused here).
ENV TPQ_CACHE_DIR=/cache TPQ_DATA_DIR=/data
CMD ["tpq", "--help"]
