"""Scraping a /metrics endpoint in tests, and summing its samples by name and labels."""
from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """The samples of one scrape: ``scrape.value(name, **labels)`` sums the samples whose labels match."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name].append((sample.labels, sample.value))

    def value(self, name: str, **labels: str) -> float:
        return sum(v for found, v in self.samples.get(name, []) if all(found.get(k) == w for k, w in labels.items()))

    def labels(self, name: str) -> list[dict[str, str]]:
        return [found for found, _ in self.samples.get(name, [])]


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    """One scrape of ``http://host:port/metrics``."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        return Scrape(response.read().decode())
