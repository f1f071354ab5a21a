"""keep_freed_memory: a process that frees and reallocates the same blocks (a client's
fresh optimizer every message) stops faulting in new pages; elsewhere nothing changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flower_app.perf import allocator

ROOT = Path(__file__).resolve().parents[2]

# what a client does for every message, on 24 layers of 2.4 MB: a fresh SGD-momentum
# optimizer with weight decay and one step; prints the minor page faults of each message
FAULTS_SCRIPT = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
kept = None
if sys.argv[2] == "keep":
    from flower_app.perf.allocator import keep_freed_memory
    kept = keep_freed_memory()
import torch
torch.set_num_threads(1)
model = torch.nn.Sequential(*[torch.nn.Linear(768, 768) for _ in range(24)])
x = torch.randn(2, 768)

def message():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True
    )
    opt.zero_grad(set_to_none=False)
    model(x).square().mean().backward()
    opt.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(json.dumps({"kept": kept, "faults": [message() for _ in range(6)]}))
"""
# pages of the momentum buffers and the weight-decay temporaries of one message
PAGES = 2 * 24 * (768 * 768 + 768) * 4 // 4096
# pages of one layer's weight-sized block: with freed blocks kept, glibc now and then
# still places one such block on fresh pages (seen: 576-595 faults in one message of
# six, in 5 children of 12); never more than that in a message
LAYER_PAGES = 768 * 768 * 4 // 4096


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, str(ROOT), mode],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not allocator.glibc_version().startswith("glibc"), reason="glibc's malloc only")
@pytest.mark.perf
def test_freed_blocks_are_reused_without_new_page_faults():
    default, kept = _faults("default"), _faults("keep")
    assert kept["kept"] is True
    # glibc's defaults hand pages back and fault them in again (how many varies with
    # its moving thresholds): over four messages, more than one message's worth
    assert sum(default["faults"][2:]) > PAGES, default
    # kept: once the heap has grown to its peak (first two messages), at most one layer's
    # block (plus a few pages) is new in a message, against a message's worth by default
    assert max(kept["faults"][2:]) < LAYER_PAGES + 64, kept


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_kept", None)
    monkeypatch.setattr(allocator, "glibc_version", lambda: "")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called"))
    assert allocator.keep_freed_memory() is False


def test_thresholds_are_set_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_kept", None)
    monkeypatch.setattr(allocator, "_set_thresholds", lambda: calls.append(1) or True)
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True
    assert calls == [1]


def test_the_clientapp_keeps_freed_memory_before_it_trains(monkeypatch):
    """Every process that trains sets the thresholds before its first step."""
    from flower_app import client_app
    from flower_app.config import RunConfig
    from tests.conftest import quick_run_config

    calls = []
    monkeypatch.setattr(client_app, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = RunConfig.from_run_config(quick_run_config(synthetic_train_per_class=20, num_clients=4))
    client_app.get_runtime(cfg, partition_id=0)
    assert calls == [1]


def test_allocator_benchmark_prints_both_settings(capsys):
    """The benchmark's short form: one pair of children, the summary line with its ratio."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import allocator_benchmark

    argv = ["--model", "vit_tiny_test", "--clients", "2", "--pairs", "1"]
    assert allocator_benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert "pair 1 default" in out and "pair 1 kept" in out
    assert "vit_tiny_test, J=1, batch 1, one thread: median client" in out
    assert "with freed memory kept (" in out and "page faults per client" in out
