"""Pure functions of (model, params, tokens): per-token losses and the ICL score (evaluate), the head measures
(heads), composition scores (composition), head ablations by path and attribution (ablation)."""
