"""Host memory: with the package imported, XLA:CPU's large buffers are reused without page faults."""

import json
import os
import platform
import subprocess
import sys

import pytest

from induction_jax.training import hostmem

# A jitted function whose output is 64 MiB: above glibc's largest mmap threshold, so by default every call maps it
# afresh and faults in each of its 16,384 pages. Kept, the heap grows to its high-water mark in the first calls
# (buffers are freed asynchronously, so a few calls overlap) and then reuses it.
PROBE = """
import resource, json
import jax, jax.numpy as jnp
import induction_jax
f = jax.jit(lambda x: jnp.tanh(x) + 1.0)
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(30):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    f(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30))
"""


def faults_per_call(**env) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE], env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_buffers_are_reused_without_page_faults():
    # Best of three: a probe that shares the machine with a full test run has once faulted a few buffers in afresh
    # (1,638 per call, 3 of 30 calls); the steady state is 0.
    assert min(faults_per_call() for _ in range(3)) < 1000
    # The same probe with the allocator left alone: the pages come back from the kernel on every call.
    assert faults_per_call(INDUCTION_JAX_KEEP_HEAP="0") > 10_000


@pytest.mark.parametrize("platforms, cpu", [("cpu", True), ("cpu,tpu", True), ("tpu", False), ("cuda,cpu", False)])
def test_only_when_xla_computes_on_the_cpu(monkeypatch, platforms, cpu):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert hostmem.computes_on_cpu() is cpu
