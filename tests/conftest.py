"""Shared pytest setup: deterministic, small, CPU-only.

Tests use tiny models, which gain nothing from a second thread and crawl when another process holds the
cores, so torch runs single-threaded here.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny world's byte-level BPE tokenizer (built once per test session)."""
    from thor_min import tiny

    return tiny.build_tokenizer()
