"""Ahead-of-time compilation of the train step and the analysis programs for a TPU slice, without the TPU
(`python -m induction_jax.plan`).

`tpu_devices("v5e:16x16")` gives that slice's devices from libtpu (the `tpu` extra: `pip install 'jax[tpu]'`);
`cpu_devices(n)` gives fake CPU devices instead. `plan` lowers the real train step (step.build's step_fn) and the
analysis programs of one snapshot (aot_analysis) on ShapeDtypeStructs that carry shardings, so nothing of the
model is ever allocated, and gathers per-device memory (arguments, outputs, temporaries, peak), FLOPs per step
(analytic and from the compiled cost analysis), the step time at a stated MFU, and the storage the snapshot
schedule needs. Only libtpu's figures get a verdict against the chip's HBM: fake CPU devices compile the CPU
code path, whose memory is another program's (`cpu_note`).
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
from tqdm.auto import tqdm

from ..base.config import Config, UserError, first_line
from ..model import attention
from ..model import model as model_lib
from . import aot_analysis, peak, schedule, sharding, step as step_lib

GIB = 2**30
FIBER_STACK = 64 * 2**20


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
    # libtpu 0.0.42.1's compiler overflows its fibers' default stacks while costing the fused convolutions of some
    # analysis programs (prefix matching, previous token: a SIGSEGV with "STACK OVERFLOW"); 64 MiB is ample.
    if "fibers_default_thread_stack_size" not in os.environ.get("LIBTPU_INIT_ARGS", ""):
        os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") +
                                          f" --fibers_default_thread_stack_size={FIBER_STACK}").strip()
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


def plan(cfg: Config, devices: list, chip: Chip, *, mfu: float, train: bool = True, analysis: bool = True,
         lanes: int | None = None) -> dict:
    """Compiles the train step and the analysis programs (aot_analysis) for `devices`; returns the figures
    `report` prints. `fits` is None where the devices are not the chip's (fake CPU devices): no verdict then."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    trainer = step_lib.build(cfg, mesh)
    m = cfg.model
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, m.context), jnp.int32, sharding=trainer.batch_sharding)
    platform = devices[0].platform
    out: dict = {"devices": len(devices), "device_kind": devices[0].device_kind, "platform": platform,
                 "mesh": dict(mesh.shape), "chip": chip.name, "hbm_gib": chip.hbm_gib,
                 "chip_key": next(k for k, c in CHIPS.items() if c == chip),
                 "eval_batch": aot_analysis.rows_for(cfg.eval.batch_size, mesh), "lanes": lanes or m.n_heads,
                 "attention": (f"fused ({attention.kernel_for(m.attention_kernel, m.context, platform)} "
                               "kernel)" if m.attention == "fused" else "explicit")}
    # With the mesh in context the model constrains its activations to the batch axes, as in training, and takes
    # the code path of the mesh's platform.
    with jax.set_mesh(mesh):
        if train:
            lowered = trainer.step_fn.lower(trainer.abstract_state, batch)
            try:
                compiled = compile_or_oom(lowered)
                out["train"] = memory(compiled)
                out["compiled_flops"] = compiled_flops(compiled) * len(devices)  # the cost of one device's program
            except DoesNotFit as e:
                out["train_oom"] = str(e)
        if analysis:
            out["analysis"] = []
            progs = aot_analysis.programs(cfg, mesh, out["lanes"])
            for prog in tqdm(progs, desc="compiling the analysis programs", unit="program", disable=None):
                try:
                    out["analysis"].append((prog, memory(compile_or_oom(prog.lower()))))
                except DoesNotFit as e:
                    out["analysis"].append((prog, str(e)))

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
    out["fits"] = verdict(out) if platform == "tpu" else None
    return out


def _fits(mem: Memory | str, hbm_gib: float) -> bool:
    return isinstance(mem, Memory) and mem.peak <= hbm_gib * GIB


def analysis_fits(out: dict) -> bool:
    return all(_fits(mem, out["hbm_gib"]) for _, mem in out.get("analysis", ()))


def verdict(out: dict) -> bool:
    """Whether every program compiled fits the chip: the train step (unless skipped) and each analysis program."""
    train = "train" not in out and "train_oom" not in out or _fits(out.get("train", ""), out["hbm_gib"])
    return train and analysis_fits(out)


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


def _mem_line(mem: Memory | str, out: dict) -> str:
    hbm = out["hbm_gib"]
    if isinstance(mem, str):
        return f"DOES NOT FIT {hbm:g} GiB: {mem}"
    figures = (f"arguments {_gib(mem.arguments)}, outputs {_gib(mem.outputs)} ({_gib(mem.aliased)} aliased to "
               f"arguments), temporaries {_gib(mem.temporaries)}, peak {_gib(mem.peak)}")
    if out["fits"] is None:
        return figures
    return f"{figures} of {hbm:g} GiB: {'fits' if _fits(mem, hbm) else 'DOES NOT FIT'}"


# A slice of each TPU chip that libtpu describes, named in the advice of `cpu_note`.
SMALL_SLICES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v4": "v4:2x2x1", "v6e": "v6e:2x2"}


def cpu_note(chip: str) -> str:
    """Why a plan for fake CPU devices gives no verdict for `chip` (a key of CHIPS), and how to get one, in one
    line. XLA:CPU compiles other code than a TPU runs: the model's CPU forms of the projections and the
    attention; and its pipeline expands the optimization barriers jax.checkpoint puts around the recomputed
    forward, after which CSE merges that forward back into the original, so remat saves nothing."""
    how = (f"install libtpu (pip install 'jax[tpu]') and compile for a slice: --topology {SMALL_SLICES[chip]}"
           if chip in SMALL_SLICES else "compile on the GPU itself (plan compiles ahead of time for TPU slices)")
    return (f"no verdict: these are the CPU compiler's figures for the CPU code path (row-major projections, the "
            f"blocked CPU attention, model.remat undone), not a {CHIPS[chip].name}'s, and differ from libtpu's by "
            f"13x and more; for the chip's own figures and a verdict, {how}")


def report(cfg: Config, out: dict, target: str) -> str:
    m, mesh = cfg.model, out["mesh"]
    where = ("compiled by libtpu for the TPU topology, no TPU used" if out["platform"] == "tpu"
             else f"compiled for fake CPU devices: the CPU compiler's estimate, not a {out['chip']}'s")
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
    if out["fits"] is None:
        lines.append(cpu_note(out["chip_key"]))
    if "train" in out or "train_oom" in out:
        lines.append(f"train step, per device: {_mem_line(out.get('train', out.get('train_oom')), out)}")
    if "analysis" in out:
        lines.append("analysis programs, per device (parameters sharded as in training, each program with the batch the "
                     "analysis gives it):")
        width = max(len(f"{p.name} ({p.inputs})") for p, _ in out["analysis"])
        lines += [f"  {f'{p.name} ({p.inputs})':<{width}}  {_mem_line(mem, out)}" for p, mem in out["analysis"]]
    if "compiled_flops" in out:
        # XLA's cost analysis cannot see into a Pallas kernel, and counts a loop's body (the chunked loss) once.
        notes = ["the splash kernel's attention is not in it" if "splash" in out["attention"]
                 else "it counts the full T x T attention the causal count halves"]
        if m.loss_chunk:
            notes.append("the chunked loss's loop body is counted once")
        compiled = (f"{out['compiled_flops']:.3e} from the compiled cost analysis (x {out['devices']} devices; "
                    f"{'; '.join(notes)})")
    else:
        compiled = "n/a"
    lines += [
        f"FLOPs per step: {out['analytic_flops']:.3e} analytic (step.flops_per_token); {compiled}",
        f"step time at {out['mfu']:.0%} MFU of {_si(out['peak_flops'], 'FLOP/s')} per {out['chip']} "
        f"({m.dtype}): {out['step_s']:.3g} s, {out['tokens_per_step'] / out['step_s']:,.0f} tokens/s; "
        f"{cfg.train.steps:,} steps in {_duration(out['step_s'] * cfg.train.steps)}",
        f"storage: {out['snapshots']} snapshots x {_si(out['snapshot_bytes'], 'B')} ({m.param_dtype}) = "
        f"{_si(out['snapshots'] * out['snapshot_bytes'], 'B')}; resume state 2 x {_si(out['resume_bytes'], 'B')}",
    ]
    if out["fits"] is not None:
        lines.append(f"verdict: {'every program fits' if out['fits'] else 'DOES NOT FIT'} {out['hbm_gib']:g} GiB "
                     f"per {out['chip']}")
    return "\n".join(lines)


def _peak_cell(mems: list) -> str:
    """The largest peak among `mems` in GiB, or what the compiler said the largest refused one needs."""
    if not mems:
        return "-"
    refused = [_needed_gib(m) for m in mems if isinstance(m, str)]
    if refused:
        return f"needs {max(refused):.1f}"
    return f"{max(m.peak for m in mems) / GIB:.2f}"


def _forward_cell(out: dict) -> str:
    return _peak_cell([mem for p, mem in out.get("analysis", ()) if p.group == "losses"])


def markdown_row(name: str, cfg: Config, out: dict, target: str) -> str:
    """docs/scale.md's training-table row (libtpu's figures only: `plan` refuses it for fake CPU devices)."""
    mesh = out["mesh"]
    if "train" in out:
        t = out["train"]
        mem = f"{t.arguments / GIB:.2f} | {t.temporaries / GIB:.2f} | {t.peak / GIB:.2f}"
    else:
        mem = f"- | - | needs {_needed_gib(out['train_oom']):.1f}"
    fits = _fits(out.get("train", ""), out["hbm_gib"])
    return (f"| {name} | {target} | {mesh['data']}x{mesh['fsdp']}x{mesh['tensor']} | {cfg.train.batch_size} | {mem} | "
            f"{_forward_cell(out)} | {'yes' if fits else 'NO'} | {out['analytic_flops']:.2e} | "
            f"{out.get('compiled_flops', float('nan')):.2e} | {out['step_s']:.2f} | "
            f"{_duration(out['step_s'] * cfg.train.steps)} | {out['snapshots']} x "
            f"{_si(out['snapshot_bytes'], 'B')} = {_si(out['snapshots'] * out['snapshot_bytes'], 'B')} |")


def analysis_row(name: str, out: dict, target: str) -> str:
    """docs/scale.md's analysis-table row: the largest per-chip peak of each group of analysis programs, the train
    step's beside them, and whether every analysis program fits."""
    mesh = out["mesh"]
    cells = [_peak_cell([mem for p, mem in out["analysis"] if p.group == g]) for g in aot_analysis.GROUPS]
    train = (f"{out['train'].peak / GIB:.2f}" if "train" in out
             else f"needs {_needed_gib(out['train_oom']):.1f}" if "train_oom" in out else "-")
    return (f"| {name} | {target} | {mesh['data']}x{mesh['fsdp']}x{mesh['tensor']} | {out['eval_batch']} | "
            f"{' | '.join(cells[:3])} | {cells[3]} ({out['lanes']} lanes) | {train} | "
            f"{'yes' if analysis_fits(out) else 'NO'} |")
