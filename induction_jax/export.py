"""`python -m induction_jax.export RUN_DIR --step N [--out DIR]`: one snapshot as a TransformerLens model.

Writes three files into DIR (default RUN_DIR/transformer_lens/step_N):
- `config.json`: keyword arguments of TransformerLens's `HookedTransformerConfig` and nothing else, so
  `HookedTransformerConfig(**json.load(f))` builds the model's config as it is;
- `weights.npz`: every parameter of that `HookedTransformer`, under its state-dict name and in its shape (float32);
  the biases our model lacks (query, key, value, attention output, unembedding) are zeros;
- `export.json`: where the weights came from (run, step) and how to load them.

What maps onto TransformerLens (3.9 or later 3.x): attention-only and MLP models (our GELU is the tanh
approximation, TransformerLens's `gelu_new`), with or without LayerNorm, shortformer positions (TransformerLens's
`shortformer`), learned (`standard`), rotary (`rotary` over the whole head, halves rotated) or none (`standard`
with a zero table), and layers whose heads are all local (`use_local_attn`). Refused: smeared keys and layers that
mix local and dense heads, which TransformerLens has no way to express. Loading, and why a shortformer export must
never go through `process_weights_()`: README.md ("TransformerLens") and docs/transformer_lens.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .analysis.run import Run
from .base import cli, logs
from .base.config import CONFIG_FILE, ModelConfig, UserError
from .model.model import sinusoidal_table

TL_REQUIREMENT = "transformer-lens>=3.9,<4"
TL_POSITIONS = {"shortformer": "shortformer", "learned": "standard", "rotary": "rotary", "none": "standard"}
ROTARY_BASE = 10_000  # model.rotate's
LOAD = [
    "import json, numpy as np, torch",
    "from transformer_lens import HookedTransformer, HookedTransformerConfig",
    "model = HookedTransformer(HookedTransformerConfig(**json.load(open('config.json'))))",
    "weights = {k: torch.from_numpy(v) for k, v in np.load('weights.npz').items()}",
    "assert weights.keys() == dict(model.named_parameters()).keys()",
    "model.load_state_dict(model.state_dict() | weights, strict=True)",
]
SHORTFORMER_WARNING = (
    "Never call process_weights_() (fold_ln, center_writing_weights, center_unembed) on this model: its position "
    "table is added after ln1, so folding ln1's weights into W_Q and W_K rescales the positions as well, and "
    "centring moves W_pos, which never passes through a LayerNorm. TransformerLens's own loader turns these off "
    "for shortformer models; docs/transformer_lens.md has the measured damage.")


def unrepresentable(m: ModelConfig) -> str | None:
    """Why TransformerLens cannot represent the model (`key=value: reason`), or None."""
    if m.smeared_key:
        return "model.smeared_key=true: TransformerLens has no smeared keys"
    if 0 < m.local_heads < m.n_heads:
        return (f"model.local_heads={m.local_heads} of model.n_heads={m.n_heads}: TransformerLens makes a whole "
                "layer local or dense, never single heads")
    return None


def hooked_config(m: ModelConfig, name: str) -> dict:
    """`HookedTransformerConfig` keyword arguments for the model (call `unrepresentable` first)."""
    cfg = {"model_name": name, "n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads,
           "d_head": m.d_head, "n_ctx": m.context, "d_vocab": m.vocab_size, "attn_only": not m.d_mlp,
           "normalization_type": "LN" if m.layer_norm else None, "eps": m.ln_eps,
           "positional_embedding_type": TL_POSITIONS[m.positions]}
    if m.d_mlp:
        # flax's nn.gelu is the tanh approximation, which is TransformerLens's gelu_new (its "gelu" is the erf one).
        cfg.update(d_mlp=m.d_mlp, act_fn="gelu_new")
    if m.positions == "rotary":
        cfg.update(rotary_dim=m.d_head, rotary_base=ROTARY_BASE, rotary_adjacent_pairs=False)
    if m.local_heads:
        cfg.update(use_local_attn=True, attn_types=["local"] * m.n_layers, window_size=m.local_window)
    return cfg


def state_dict(m: ModelConfig, params) -> dict[str, np.ndarray]:
    """Our params as every parameter of TransformerLens's HookedTransformer (its names and shapes, float32)."""
    d, h, e = m.d_model, m.n_heads, m.d_head
    sd = {"embed.W_E": params["W_E"], "unembed.W_U": params["W_U"], "unembed.b_U": np.zeros(m.vocab_size)}
    if m.positions in ("shortformer", "learned"):
        sd["pos_embed.W_pos"] = (params["W_pos"] if m.pos_table == "learned"
                                 else sinusoidal_table(m.context, m.d_model))
    elif m.positions == "none":
        sd["pos_embed.W_pos"] = np.zeros((m.context, d))  # "standard" positions that add nothing
    if m.layer_norm:
        sd["ln_final.w"], sd["ln_final.b"] = params["ln_final"]["scale"], params["ln_final"]["bias"]
    for layer in range(m.n_layers):
        block, pre = params[f"block_{layer}"], f"blocks.{layer}"
        for ln in (("ln1", "ln2") if m.d_mlp else ("ln1",)) if m.layer_norm else ():
            sd[f"{pre}.{ln}.w"], sd[f"{pre}.{ln}.b"] = block[ln]["scale"], block[ln]["bias"]
        attn = block["attn"]
        for name in ("Q", "K", "V"):  # ours [D, H, E], theirs [H, D, E]
            sd[f"{pre}.attn.W_{name}"] = np.transpose(np.asarray(attn[f"W_{name}"]), (1, 0, 2))
            sd[f"{pre}.attn.b_{name}"] = np.zeros((h, e))
        sd[f"{pre}.attn.W_O"], sd[f"{pre}.attn.b_O"] = attn["W_O"], np.zeros(d)  # W_O is [H, E, D] in both
        if m.d_mlp:
            for name in ("W_in", "b_in", "W_out", "b_out"):
                sd[f"{pre}.mlp.{name}"] = block["mlp"][name]
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def transformer_lens(run: Run, step: int, out: str | Path) -> Path:
    """Exports snapshot `step` of `run` into directory `out` (config.json, weights.npz, export.json)."""
    m = run.config.model
    why = unrepresentable(m)
    if why:
        raise UserError(f"{run.path / CONFIG_FILE}: {why}; nothing exported")
    params = run.params(step)  # SnapshotError (one line) when the step has no committed snapshot
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{run.path.name}@{step}"
    meta = {"run": str(run.path.resolve()), "step": step, "requires": TL_REQUIREMENT,
            "config": "config.json: HookedTransformerConfig(**json.load(f)), as it is",
            "weights": "weights.npz: every parameter; load with strict=True, keeping TransformerLens's own "
                       "buffers (attention masks, rotary tables)",
            "load": LOAD}
    if m.positions == "shortformer" and m.layer_norm:
        meta["warning"] = SHORTFORMER_WARNING
    _write(out / "weights.npz", lambda f: np.savez(f, **state_dict(m, params)))
    _write(out / "config.json", lambda f: f.write(json.dumps(hooked_config(m, name), indent=1).encode()))
    _write(out / "export.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return out


def _write(path: Path, write) -> None:
    """Whole or not at all: a killed export never leaves a truncated file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m induction_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--step", type=int, required=True, help="the snapshot to export")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/transformer_lens/step_N)")
    args = parser.parse_args(argv)
    logs.divert()
    run = Run(args.run_dir)
    out = transformer_lens(run, args.step, args.out or args.run_dir / "transformer_lens" / f"step_{args.step}")
    print(f"wrote {out}/{{config.json, weights.npz, export.json}}")
    return 0


if __name__ == "__main__":
    cli.run(main)
