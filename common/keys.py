"""Every Redis key, pub/sub channel and rq queue name tpqueue uses.

Each entity has one prefix and one small function that builds its name;
nothing else in tpqueue formats a key. Inputs are validated here, so a bad
job id or group name fails with a clear :class:`InvalidRequestError` instead
of writing a surprising key.

=====================  ===============================  ==========================================
function               name                             Redis type / use
=====================  ===============================  ==========================================
shard_queue_name(s)    ``gen.<s>``                      rq queue of shard ``s`` (rq stores it at
                                                        ``rq:queue:gen.<s>``)
BATCH_QUEUE            ``batch``                        rq queue of session-less offline jobs
rq_queue_key(q)        ``rq:queue:<q>``                 rq's list of queued job ids (LLEN = depth)
rq_job_key(j)          ``rq:job:<j>``                   rq's job hash
rq_result_key(j)       ``rq:results:<j>``               rq's result stream (XREAD to wait)
token_channel(j)       ``tpq:tokens:<j>``               pub/sub channel of job ``j``'s tokens
token_log(j)           ``tpq:log:<j>``                  stream: capped durable token log (resume)
cancel_flag(j)         ``tpq:cancel:<j>``               string with TTL: cancel request of job ``j``
batch_info(b)          ``tpq:batch:<b>``                hash: metadata of a submitted batch
batch_jobs(b)          ``tpq:batchjobs:<b>``            list: job ids of batch ``b`` in order
heartbeat(g, r)        ``tpq:hb:<g>:<r>``               string (JSON) with TTL: rank ``r`` of group
                                                        ``g`` is alive
group_info(g)          ``tpq:group:<g>``                hash: a worker group's static facts
groups_set()           ``tpq:groups``                   set: names of registered worker groups
shard_map()            ``tpq:shardmap``                 hash: shard -> owning group
shard_map_epoch()      ``tpq:shardepoch``               string (INCR): epoch fencing the shard map
supervisor_lock()      ``tpq:lock:supervisor``          string (SET NX PX): one active supervisor
claimed_jobs(g)        ``tpq:claimed:<g>``              list: job ids group ``g`` took off a queue
                                                        and has not yet started (crash-safe dequeue)
job_counter(c)         ``tpq:count:<c>``                hash: queue name -> jobs counted by clients
                                                        (``enqueued``, ``cancelled`` while queued)
completion(c)          ``tpq:completion:<c>``           string (JSON) with TTL: the gateway's record of an
                                                        HTTP completion ``c`` (its jobs, kind, model)
stream_attach(c)       ``tpq:attach:<c>``               string (INCR) with TTL: HTTP streams that
                                                        attached to completion ``c`` (disconnect grace)
api_key_names()        ``tpq:keynames``                 hash: API key name -> its key id (the SHA-256
                                                        hex digest of the key; never the key itself)
api_key(k)             ``tpq:apikey:<k>``               hash: the record of API key ``k`` (name, prefix,
                                                        created, rpm, tpm, priority)
rate_limit(k)          ``tpq:ratelimit:<k>``            hash with TTL: API key ``k``'s request and token
                                                        buckets (levels and when they were last filled)
api_file(f)            ``tpq:file:<f>``                 hash: an uploaded (or batch output) file of the
                                                        Batch API: its object's fields and ``content``
                                                        (or ``part``: see api_file_part)
api_files()            ``tpq:files``                    sorted set: file ids, newest first (listing)
api_batch(b)           ``tpq:apibatch:<b>``             hash: the state of an HTTP Batch API batch
                                                        (status, timestamps, counts, files, errors)
api_batches()          ``tpq:apibatches``               sorted set: HTTP batch ids, newest first (listing)
api_batches_open()     ``tpq:apibatchopen``             set: HTTP batches not yet final (the keepers' work)
api_batch_lines(b)     ``tpq:apibatchlines:<b>``        list: batch ``b``'s checked input lines (JSON)
api_batch_output(b)    ``tpq:apibatchout:<b>``          hash: custom_id -> output line, each written once
api_batch_done(b)      ``tpq:apibatchdone:<b>``         set: positions of batch ``b``'s lines that have
                                                        an output line (written with it)
api_file_part(f, p)    ``tpq:filepart:<f>:<p>``         list: the content of file ``f`` in chunks, as
                                                        written by writer ``p`` (a batch's output files)
api_batch_lease(b)     ``tpq:lock:apibatch:<b>``        string (SET NX PX): the gateway replica driving
                                                        batch ``b``
vocab(m)               ``tpq:vocab:<m>``                hash: model ``m``'s vocabulary (token id -> bytes),
                                                        published by its worker groups for the gateway
=====================  ===============================  ==========================================

``<s>`` is a shard number in ``[0, num_shards)``; ``<j>`` a job id (see
:func:`validate_job_id`); ``<g>`` a group name (see
:func:`validate_group_name`); ``<r>`` a rank; ``<b>`` a batch id (same rules
as job ids). The ``rq:`` names are rq's own (rq 2.12); they are spelled here
once so that pipelines and Lua scripts need not guess them, and a test checks
them against rq.

Sessions map to shards with :func:`shard_for_session`: the first 8 bytes of
BLAKE2b (digest size 8) of the UTF-8 session id, as a big-endian unsigned
integer, modulo the number of shards. It is stable across processes,
machines and Python versions (unlike ``hash()``).
"""
from __future__ import annotations

import hashlib

from common.errors import InvalidRequestError
from common.key_names import (  # the parts' rules, re-exported (keys.validate_job_id)
    MAX_GROUP_NAME_CHARS,
    MAX_JOB_ID_CHARS,
    MAX_MODEL_NAME_CHARS,
    MAX_NUM_SHARDS,
    MAX_RANK,
    MAX_SESSION_ID_CHARS,
    _check_rank,
    _check_shard,
    validate_batch_id,
    validate_file_id,
    validate_group_name,
    validate_job_id,
    validate_num_shards,
    validate_session_id,
)

KEY_PREFIX = "tpq:"
SHARD_QUEUE_PREFIX = "gen."
BATCH_QUEUE = "batch"

RQ_QUEUE_PREFIX = "rq:queue:"
RQ_JOB_PREFIX = "rq:job:"
RQ_RESULT_PREFIX = "rq:results:"
JOB_ATTEMPTS_FIELD = "tpq_attempts"  # tpqueue's fields in rq's job hash: times a group started the job,
JOB_LOGGED_AT_START_FIELD = "tpq_logged_at_start"  # and the log position the latest attempt writes first

TOKEN_CHANNEL_PREFIX = "tpq:tokens:"
TOKEN_LOG_PREFIX = "tpq:log:"
CANCEL_FLAG_PREFIX = "tpq:cancel:"
BATCH_INFO_PREFIX = "tpq:batch:"
BATCH_JOBS_PREFIX = "tpq:batchjobs:"
HEARTBEAT_PREFIX = "tpq:hb:"
GROUP_INFO_PREFIX = "tpq:group:"
GROUPS_SET = "tpq:groups"
SHARD_MAP = "tpq:shardmap"
SHARD_MAP_EPOCH = "tpq:shardepoch"
SUPERVISOR_LOCK = "tpq:lock:supervisor"
CLAIMED_JOBS_PREFIX = "tpq:claimed:"
JOB_COUNTER_PREFIX = "tpq:count:"
COMPLETION_PREFIX = "tpq:completion:"
STREAM_ATTACH_PREFIX = "tpq:attach:"
API_KEY_NAMES = "tpq:keynames"
API_KEY_PREFIX = "tpq:apikey:"
RATE_LIMIT_PREFIX = "tpq:ratelimit:"
API_FILE_PREFIX = "tpq:file:"
API_FILES = "tpq:files"
API_BATCH_PREFIX = "tpq:apibatch:"
API_BATCHES = "tpq:apibatches"
API_BATCHES_OPEN = "tpq:apibatchopen"
API_BATCH_LINES_PREFIX = "tpq:apibatchlines:"
API_BATCH_OUTPUT_PREFIX = "tpq:apibatchout:"
API_BATCH_LEASE_PREFIX = "tpq:lock:apibatch:"
API_BATCH_DONE_PREFIX = "tpq:apibatchdone:"
API_FILE_PART_PREFIX = "tpq:filepart:"
VOCAB_PREFIX = "tpq:vocab:"
JOB_COUNTERS = ("enqueued", "cancelled")  # what clients count per queue (see job_counter)



# ---------------------------------------------------------------- sharding


def shard_for_session(session_id: str, num_shards: int) -> int:
    """The shard in ``[0, num_shards)`` that ``session_id`` always maps to.

    ``int.from_bytes(blake2b(session_id.encode("utf-8"), digest_size=8).digest(), "big") % num_shards``.
    """
    validate_session_id(session_id)
    validate_num_shards(num_shards)
    digest = hashlib.blake2b(session_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


# ---------------------------------------------------------------- rq queues


def shard_queue_name(shard: int) -> str:
    """The rq queue name of ``shard``: ``gen.<shard>``."""
    return f"{SHARD_QUEUE_PREFIX}{_check_shard(shard)}"


def shard_queue_names(num_shards: int) -> list[str]:
    """The rq queue names of shards ``0 .. num_shards - 1``, in shard order."""
    return [shard_queue_name(s) for s in range(validate_num_shards(num_shards))]


def shard_of_queue_name(queue_name: str) -> int:
    """The shard number in a ``gen.<shard>`` queue name; :class:`InvalidRequestError` otherwise."""
    digits = queue_name[len(SHARD_QUEUE_PREFIX):] if queue_name.startswith(SHARD_QUEUE_PREFIX) else ""
    if not digits.isascii() or not digits.isdigit() or str(int(digits)) != digits:
        raise InvalidRequestError(f"{queue_name!r} is not a shard queue name (expected 'gen.<shard>')")
    return _check_shard(int(digits))


def rq_queue_key(queue_name: str) -> str:
    """rq's Redis list of a queue's job ids: ``rq:queue:<queue_name>`` (its LLEN is the depth)."""
    return f"{RQ_QUEUE_PREFIX}{queue_name}"


def rq_job_key(job_id: str) -> str:
    """rq's Redis hash of a job: ``rq:job:<job_id>``."""
    return f"{RQ_JOB_PREFIX}{validate_job_id(job_id)}"


def rq_result_key(job_id: str) -> str:
    """rq's Redis stream of a job's results: ``rq:results:<job_id>``."""
    return f"{RQ_RESULT_PREFIX}{validate_job_id(job_id)}"


# ---------------------------------------------------------------- per job


def token_channel(job_id: str) -> str:
    """Pub/sub channel of a job's token events: ``tpq:tokens:<job_id>``."""
    return f"{TOKEN_CHANNEL_PREFIX}{validate_job_id(job_id)}"


def token_log(job_id: str) -> str:
    """Stream holding a job's token events durably (replay, resume): ``tpq:log:<job_id>``."""
    return f"{TOKEN_LOG_PREFIX}{validate_job_id(job_id)}"


def cancel_flag(job_id: str) -> str:
    """String key set when a client cancels a job: ``tpq:cancel:<job_id>``."""
    return f"{CANCEL_FLAG_PREFIX}{validate_job_id(job_id)}"


def batch_info(batch_id: str) -> str:
    """Hash with the metadata of a submitted batch: ``tpq:batch:<batch_id>``."""
    return f"{BATCH_INFO_PREFIX}{validate_batch_id(batch_id)}"


def batch_jobs(batch_id: str) -> str:
    """List of the job ids of a batch, in submission order: ``tpq:batchjobs:<batch_id>``."""
    return f"{BATCH_JOBS_PREFIX}{validate_batch_id(batch_id)}"


# ---------------------------------------------------------------- worker groups


def heartbeat(group: str, rank: int) -> str:
    """String key (JSON, with TTL) of one rank's heartbeat: ``tpq:hb:<group>:<rank>``."""
    return f"{HEARTBEAT_PREFIX}{validate_group_name(group)}:{_check_rank(rank)}"


def heartbeat_pattern(group: str | None = None) -> str:
    """SCAN MATCH pattern of heartbeat keys: of all groups, or of one group's ranks."""
    if group is None:
        return f"{HEARTBEAT_PREFIX}*"
    return f"{HEARTBEAT_PREFIX}{validate_group_name(group)}:*"


def parse_heartbeat_key(key: str | bytes) -> tuple[str, int]:
    """``(group, rank)`` of a key made by :func:`heartbeat`; :class:`InvalidRequestError` otherwise."""
    text = key.decode() if isinstance(key, bytes) else key
    group, sep, rank = text[len(HEARTBEAT_PREFIX):].rpartition(":")
    if not text.startswith(HEARTBEAT_PREFIX) or not sep or not rank.isascii() or not rank.isdigit():
        raise InvalidRequestError(f"{text!r} is not a heartbeat key (expected 'tpq:hb:<group>:<rank>')")
    return validate_group_name(group), _check_rank(int(rank))


def group_info(group: str) -> str:
    """Hash of a worker group's facts (tp size, model, host, started_at): ``tpq:group:<group>``."""
    return f"{GROUP_INFO_PREFIX}{validate_group_name(group)}"


def groups_set() -> str:
    """Set of the names of registered worker groups: ``tpq:groups``."""
    return GROUPS_SET


def shard_map() -> str:
    """Hash from shard number to owning group name: ``tpq:shardmap``."""
    return SHARD_MAP


def shard_map_epoch() -> str:
    """Integer incremented on every shard-map change; fences stale owners: ``tpq:shardepoch``."""
    return SHARD_MAP_EPOCH


def supervisor_lock() -> str:
    """Lock key (SET NX PX) held by the one active supervisor: ``tpq:lock:supervisor``."""
    return SUPERVISOR_LOCK


def claimed_jobs(group: str) -> str:
    """List of job ids a group moved off their queue and has not yet started: ``tpq:claimed:<group>``.

    A job id moves from its queue into this list atomically (LMOVE), and
    leaves it only once rq records the job as started; a group that dies in
    between finds its ids here when it restarts and puts them back.
    """
    return f"{CLAIMED_JOBS_PREFIX}{validate_group_name(group)}"


def job_counter(counter: str) -> str:
    """Hash from queue name to a count clients keep in Redis: ``tpq:count:<counter>``.

    ``enqueued`` counts jobs a client enqueued (right after a single
    submit's enqueue, in a batch's own transaction); ``cancelled`` counts jobs a client cancelled
    while they were still queued (no worker saw them). The supervisor
    exports both (``tpq_jobs_enqueued_total``, ``tpq_jobs_cancelled_queued_total``).
    """
    if counter not in JOB_COUNTERS:
        raise InvalidRequestError(f"unknown job counter {counter!r}; use one of {', '.join(JOB_COUNTERS)}")
    return f"{JOB_COUNTER_PREFIX}{counter}"


# ---------------------------------------------------------------- the HTTP gateway


def completion(completion_id: str) -> str:
    """String (JSON, with TTL) recording an OpenAI-style completion the gateway created: ``tpq:completion:<id>``.

    It records what any gateway replica needs to resume or fetch the
    completion: its kind (chat or text), model, creation time, number of
    jobs and whether its stream ends with a usage chunk. ``<id>`` follows the
    job-id rules (it is the id of the completion's first job).
    """
    return f"{COMPLETION_PREFIX}{validate_job_id(completion_id)}"


def stream_attach(completion_id: str) -> str:
    """Counter (INCR, with TTL) of the HTTP streams that attached to a completion: ``tpq:attach:<id>``.

    A stream that loses its client remembers the count it attached with; if
    no other stream attached (resumed) within the disconnect grace, the
    count is unchanged and the completion's jobs are cancelled.
    """
    return f"{STREAM_ATTACH_PREFIX}{validate_job_id(completion_id)}"


# ---------------------------------------------------------------- the gateway's API keys and rate limits


def api_key_names() -> str:
    """Hash from each API key's name to its id (SHA-256 hex digest); exists while any key does: ``tpq:keynames``."""
    return API_KEY_NAMES


def api_key(key_id: str) -> str:
    """Hash recording one API key by its id (SHA-256 hex digest, never the key): ``tpq:apikey:<id>``."""
    return f"{API_KEY_PREFIX}{validate_job_id(key_id)}"  # a hex digest passes the job-id rules


def rate_limit(key_id: str) -> str:
    """Hash (TTL: until both would be full) of an API key's request and token buckets: ``tpq:ratelimit:<id>``."""
    return f"{RATE_LIMIT_PREFIX}{validate_job_id(key_id)}"


# ---------------------------------------------------------------- the gateway's Batch API (files and batches)


def api_file(file_id: str) -> str:
    """Hash of one Batch API file: its object's fields and its ``content``: ``tpq:file:<id>``."""
    return f"{API_FILE_PREFIX}{validate_file_id(file_id)}"


def api_files() -> str:
    """Sorted set of every Batch API file id, scored by minus its creation time in ms: ``tpq:files``."""
    return API_FILES


def api_batch(batch_id: str) -> str:
    """Hash of one HTTP Batch API batch (status, timestamps, request counts, files): ``tpq:apibatch:<id>``.

    Not :func:`batch_info`, which belongs to the Python client's batches.
    """
    return f"{API_BATCH_PREFIX}{validate_batch_id(batch_id)}"


def api_batches() -> str:
    """Sorted set of every HTTP batch id, scored by minus its creation time in ms: ``tpq:apibatches``."""
    return API_BATCHES


def api_batches_open() -> str:
    """Set of the HTTP batches that are not final yet, which every gateway's batch keeper drives: ``tpq:apibatchopen``."""
    return API_BATCHES_OPEN


def api_batch_lines(batch_id: str) -> str:
    """List of an HTTP batch's checked input lines, JSON, in file order: ``tpq:apibatchlines:<id>``."""
    return f"{API_BATCH_LINES_PREFIX}{validate_batch_id(batch_id)}"


def api_batch_output(batch_id: str) -> str:
    """Hash from custom_id to the output line of an HTTP batch, each written once: ``tpq:apibatchout:<id>``."""
    return f"{API_BATCH_OUTPUT_PREFIX}{validate_batch_id(batch_id)}"


def api_batch_done(batch_id: str) -> str:
    """Set of the positions (0-based) of an HTTP batch's lines that have an output line: ``tpq:apibatchdone:<id>``."""
    return f"{API_BATCH_DONE_PREFIX}{validate_batch_id(batch_id)}"


def api_file_part(file_id: str, part: str) -> str:
    """List of a Batch API file's content chunks as one writer wrote them: ``tpq:filepart:<id>:<part>``.

    ``part`` names the writer (same rules as file ids), so that two writers
    of the same file never mix their chunks; the file's hash says which
    part is its content.
    """
    return f"{API_FILE_PART_PREFIX}{validate_file_id(file_id)}:{validate_file_id(part)}"


def api_batch_lease(batch_id: str) -> str:
    """Lease (SET NX PX, renewed) of the gateway replica that drives an HTTP batch: ``tpq:lock:apibatch:<id>``."""
    return f"{API_BATCH_LEASE_PREFIX}{validate_batch_id(batch_id)}"


# ---------------------------------------------------------------- a model's vocabulary, for the gateway


def vocab(model: str) -> str:
    """Hash of one model's vocabulary (each token id's bytes), which its groups publish: ``tpq:vocab:<model>``.

    ``<model>`` is the model name as groups register it (a path, a hub id):
    1 to 1024 characters, none of them a control character.
    """
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_NAME_CHARS or not model.isprintable():
        raise InvalidRequestError(f"a model name must be 1 to {MAX_MODEL_NAME_CHARS} printable characters")
    return f"{VOCAB_PREFIX}{model}"
