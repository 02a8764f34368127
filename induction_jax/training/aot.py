"""Ahead-of-time compilation of the train step for a TPU slice, without the TPU (`python -m induction_jax.plan`).

`--topology v5e:16x16` compiles with libtpu (the `tpu` extra: `pip install 'jax[tpu]'`) for that slice's devices;
`--devices N` compiles for N fake CPU devices instead (the CPU compiler's memory figures, which differ from a
TPU's). Either way it lowers the real train step (step.build's step_fn) and the analysis forward (evaluate's
per-token losses) on ShapeDtypeStructs that carry shardings, so nothing of the model is ever allocated, and prints
per-device memory (arguments, outputs, temporaries, peak) against the chip's HBM, FLOPs per step (analytic and
from the compiled cost analysis), the step time at a stated MFU, and the storage the snapshot schedule needs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..base.config import Config, UserError, first_line
from ..measures import evaluate
from ..model import attention
from ..model import model as model_lib
from . import peak, schedule, sharding, step as step_lib

GIB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str  # the key of peak.DATASHEET
    hbm_gib: float  # per device, as the compiler sees one device
    accelerator: str  # TPU_ACCELERATOR_TYPE prefix; the count that follows is chips (v5e, v6e) or cores (v4, v5p)
    cores_per_chip: int = 1


# Keyed by the short name a topology starts with; jax's device_kind for each is listed in DEVICE_KINDS.
CHIPS = {
    "v5e": Chip("TPU v5e", 16, "v5litepod"),
    "v5p": Chip("TPU v5p", 95, "v5p", cores_per_chip=2),
    "v4": Chip("TPU v4", 32, "v4", cores_per_chip=2),
    "v6e": Chip("TPU v6e", 32, "v6e"),
    "h100": Chip("H100", 80, ""),
    "h200": Chip("H200", 141, ""),
    "a100": Chip("A100", 80, ""),
}
DEVICE_KINDS = {"TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v4": "v4", "TPU v6 lite": "v6e"}


@dataclass
class Memory:
    """Per-device bytes of one compiled program."""
    arguments: int
    outputs: int
    aliased: int  # outputs that reuse argument buffers (the donated train state)
    temporaries: int
    peak: int  # as the compiler reports it, or arguments + outputs - aliased + temporaries where that is larger


def chip_named(name: str) -> Chip:
    key = name.lower()
    if key not in CHIPS:
        raise UserError(f"--chip {name}: unknown; choose from {', '.join(CHIPS)}")
    return CHIPS[key]


def tpu_devices(topology: str) -> tuple[list, Chip]:
    """The devices of a named TPU slice (e.g. v5e:16x16, v5p:4x4x4), from libtpu's topology description."""
    prefix = topology.split(":")[0].lower()
    if prefix not in CHIPS or not CHIPS[prefix].accelerator:
        raise UserError(f"--topology {topology}: name a TPU slice as <chip>:<shape>, chip one of "
                        f"{', '.join(k for k, c in CHIPS.items() if c.accelerator)} (e.g. v5e:16x16)")
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"--topology {topology} needs libtpu, which is not installed: pip install 'jax[tpu]' "
                        "(the project's `tpu` extra), or compile for fake CPU devices with --devices N")
    chip = CHIPS[prefix]
    shape = topology.split(":", 1)[1] if ":" in topology else ""
    chips = math.prod(int(d) for d in shape.split("x")) if re.fullmatch(r"\d+(x\d+)*", shape) else 0
    # libtpu otherwise looks for a TPU of its own: the GCE metadata server, a lock file, the worker hostnames.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if chips:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.accelerator}-{chips * chip.cores_per_chip}")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu reports a bad name as one of several runtime error types
        raise UserError(f"--topology {topology}: libtpu refused it ({first_line(e, limit=300)})") from None
    return list(desc.devices), chip


def cpu_devices(n: int) -> list:
    """n fake CPU devices; the caller must have made sure jax was started with them (see `main`)."""
    devices = jax.devices("cpu")
    if len(devices) != n:
        raise UserError(f"--devices {n}: this process has {len(devices)} CPU devices")
    return devices


def memory(compiled) -> Memory:
    m = compiled.memory_analysis()
    args, outs = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temps = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    # The CPU compiler's "peak" leaves temporaries out; the live set is at least everything it does count.
    return Memory(args, outs, alias, temps, max(int(m.peak_memory_in_bytes), args + outs - alias + temps))


def compiled_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


class DoesNotFit(Exception):
    """The TPU compiler refused the program for lack of HBM; carries its one-line account of what it needed."""


def compile_or_oom(lowered):
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001 - jax's runtime error type
        if "Vmem" in str(e):  # a kernel's on-chip scratch, not HBM: the tiles, not the slice, are too big
            raise UserError(f"a kernel of the step does not fit the chip's VMEM ({first_line(e, limit=200)}); "
                            "try a smaller model.attention_block") from None
        if "RESOURCE_EXHAUSTED" in str(e):
            raise DoesNotFit(first_line(e, limit=300).replace("RESOURCE_EXHAUSTED: ", "")) from None
        raise


def _needed_gib(message: str) -> float:
    """The memory an out-of-memory message says the program needs, else NaN. libtpu words it two ways:
    "... temporaries (92.48G) exceeds ..." and "... Used 16.82G of 15.75G hbm ..."."""
    sizes = re.findall(r"\(([\d.]+)([KMGT])\)", message) or re.findall(r"Used ([\d.]+)([KMGT]) of", message)
    if not sizes:
        return float("nan")
    value, unit = sizes[0]
    return float(value) * 1024 ** ("KMGT".index(unit) - 2)


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def plan(cfg: Config, devices: list, chip: Chip, *, mfu: float, forward: bool = True) -> dict:
    """Compiles the train step (and the analysis forward) for `devices`; returns the figures `report` prints."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    trainer = step_lib.build(cfg, mesh)
    m = cfg.model
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, m.context), jnp.int32, sharding=trainer.batch_sharding)
    out: dict = {"devices": len(devices), "device_kind": devices[0].device_kind, "platform": devices[0].platform,
                 "mesh": dict(mesh.shape), "chip": chip.name, "hbm_gib": chip.hbm_gib,
                 "attention": (f"fused ({attention.kernel_for(m.attention_kernel, m.context, devices[0].platform)} "
                               "kernel)" if m.attention == "fused" else "explicit")}
    # With the mesh in context the model constrains its activations to the batch axes, as in training.
    with jax.set_mesh(mesh):
        lowered = trainer.step_fn.lower(trainer.abstract_state, batch)
        try:
            compiled = compile_or_oom(lowered)
            out["train"] = memory(compiled)
            out["compiled_flops"] = compiled_flops(compiled) * len(devices)  # the cost of one device's program
        except DoesNotFit as e:
            out["train_oom"] = str(e)
        if forward:
            ways = mesh.shape["data"] * mesh.shape["fsdp"]
            eval_batch = -(-cfg.eval.batch_size // ways) * ways  # rounded up to split evenly over the batch axes
            length = min(cfg.data.eval_length, m.context)
            params = _abstract(model_lib.abstract_params(m), sharding.param_shardings(m, mesh))
            tokens = jax.ShapeDtypeStruct((eval_batch, length), jnp.int32, sharding=trainer.batch_sharding)
            # evaluate's own jitted per-token losses: the forward every snapshot goes through in analysis.
            lowered = evaluate._batch_losses.lower(model_lib.make(m), params, tokens)
            out["forward_shape"] = (eval_batch, length)
            try:
                out["forward"] = memory(compile_or_oom(lowered))
            except DoesNotFit as e:
                out["forward_oom"] = str(e)

    tokens_per_step = cfg.train.batch_size * m.context
    out["tokens_per_step"] = tokens_per_step
    out["analytic_flops"] = step_lib.flops_per_token(cfg) * tokens_per_step
    bf16, f32 = peak.DATASHEET[chip.name]
    out["peak_flops"] = bf16 if m.dtype == "bfloat16" else f32
    out["mfu"] = mfu
    out["step_s"] = out["analytic_flops"] / (len(devices) * out["peak_flops"] * mfu)
    out["params"] = model_lib.count_params(m)
    out["non_embedding_params"] = model_lib.count_params(m, embedding=False)
    param_bytes = np.dtype(jnp.dtype(m.param_dtype)).itemsize
    snaps = schedule.snapshot_steps(cfg.snapshots, cfg.train.steps)
    out["snapshots"] = len(snaps)
    out["snapshot_bytes"] = out["params"] * param_bytes
    # Resume state: params plus AdamW's two moments, each in the params' dtype; the latest 2 are kept.
    out["resume_bytes"] = 3 * out["params"] * param_bytes
    out["fits"] = "train" in out and out["train"].peak <= chip.hbm_gib * GIB
    return out


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _si(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} days"


def _mem_line(mem: Memory, hbm_gib: float) -> str:
    verdict = "fits" if mem.peak <= hbm_gib * GIB else "DOES NOT FIT"
    return (f"arguments {_gib(mem.arguments)}, outputs {_gib(mem.outputs)} ({_gib(mem.aliased)} aliased to "
            f"arguments), temporaries {_gib(mem.temporaries)}, peak {_gib(mem.peak)} of {hbm_gib:g} GiB: {verdict}")


# XLA:CPU's pipeline expands the optimization barriers jax.checkpoint puts around the recomputed forward, and a
# later CSE pass merges that forward back into the original: what the backward needs stays live, as without remat.
CPU_UNDOES_REMAT = ("note: the CPU compiler undoes model.remat (it removes the barriers that keep the recomputed "
                    "forward apart), so this memory is the step's without remat; compile for a TPU topology "
                    "(--topology) to see remat's saving")


def report(cfg: Config, out: dict, target: str) -> str:
    m, mesh = cfg.model, out["mesh"]
    where = ("compiled by libtpu for the TPU topology, no TPU used" if out["platform"] == "tpu"
             else f"compiled for fake CPU devices: memory is the CPU compiler's estimate, not a {out['chip']}'s")
    per_dev = cfg.train.batch_size / (mesh["data"] * mesh["fsdp"])
    lines = [
        f"plan: {target}: {out['devices']} x {out['device_kind']} ({where})",
        f"model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, d_mlp {m.d_mlp}, context {m.context}, "
        f"{_si(out['non_embedding_params'])} non-embedding / {_si(out['params'])} params, {m.dtype} compute, "
        f"{m.param_dtype} params",
        f"mesh: data {mesh['data']} x fsdp {mesh['fsdp']} x tensor {mesh['tensor']}; batch {cfg.train.batch_size} x "
        f"{m.context} = {out['tokens_per_step']:,} tokens/step ({per_dev:g} per data x fsdp shard)",
        f"train step: attention {out['attention']}, remat {m.remat}, loss chunk {m.loss_chunk or 'off'}",
    ]
    if m.remat != "none" and out["platform"] == "cpu":
        lines.append(CPU_UNDOES_REMAT)
    if "train" in out:
        lines.append(f"train step, per device: {_mem_line(out['train'], out['hbm_gib'])}")
    else:
        lines.append(f"train step, per device: DOES NOT FIT {out['hbm_gib']:g} GiB: {out['train_oom']}")
    if "forward" in out:
        b, t = out["forward_shape"]
        lines.append(f"analysis forward ({b} x {t} tokens), per device: {_mem_line(out['forward'], out['hbm_gib'])}")
    elif "forward_oom" in out:
        lines.append(f"analysis forward, per device: DOES NOT FIT: {out['forward_oom']}")
    # XLA's cost analysis cannot see into a Pallas kernel, and counts a loop's body (the chunked loss) once.
    notes = ["the splash kernel's attention is not in it" if "splash" in out["attention"]
             else "it counts the full T x T attention the causal count halves"]
    if m.loss_chunk:
        notes.append("the chunked loss's loop body is counted once")
    compiled = (f"{out['compiled_flops']:.3e} from the compiled cost analysis (x {out['devices']} devices; "
                f"{'; '.join(notes)})" if "compiled_flops" in out else "n/a")
    lines += [
        f"FLOPs per step: {out['analytic_flops']:.3e} analytic (step.flops_per_token); {compiled}",
        f"step time at {out['mfu']:.0%} MFU of {_si(out['peak_flops'], 'FLOP/s')} per {out['chip']} "
        f"({m.dtype}): {out['step_s']:.3g} s, {out['tokens_per_step'] / out['step_s']:,.0f} tokens/s; "
        f"{cfg.train.steps:,} steps in {_duration(out['step_s'] * cfg.train.steps)}",
        f"storage: {out['snapshots']} snapshots x {_si(out['snapshot_bytes'], 'B')} ({m.param_dtype}) = "
        f"{_si(out['snapshots'] * out['snapshot_bytes'], 'B')}; resume state 2 x {_si(out['resume_bytes'], 'B')}",
    ]
    return "\n".join(lines)


def markdown_row(name: str, cfg: Config, out: dict, target: str) -> str:
    mesh = out["mesh"]
    if "train" in out:
        t = out["train"]
        mem = f"{t.arguments / GIB:.2f} | {t.temporaries / GIB:.2f} | {t.peak / GIB:.2f}"
    else:
        mem = f"- | - | needs {_needed_gib(out['train_oom']):.1f}"
    fwd = f"{out['forward'].peak / GIB:.2f}" if "forward" in out else "-"
    return (f"| {name} | {target} | {mesh['data']}x{mesh['fsdp']}x{mesh['tensor']} | {cfg.train.batch_size} | {mem} | "
            f"{fwd} | {'yes' if out['fits'] else 'NO'} | {out['analytic_flops']:.2e} | "
            f"{out.get('compiled_flops', float('nan')):.2e} | {out['step_s']:.2f} | "
            f"{_duration(out['step_s'] * cfg.train.steps)} | {out['snapshots']} x "
            f"{_si(out['snapshot_bytes'], 'B')} = {_si(out['snapshots'] * out['snapshot_bytes'], 'B')} |")



