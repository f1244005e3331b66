"""breaker2's own float64 references (independent of kacq_hooks)."""
import torch


def expert_c64(mod, x, e):
    """C of expert e on rows x, float64, from the 3-D weights."""
    x = x.double()
    w = mod.gate_up_proj[e].double() if hasattr(mod, "gate_up_proj") else mod.up_proj[e].double()
    transposed = getattr(mod, "is_transposed", False)
    h = x @ w if transposed else x @ w.T
    if getattr(mod, "has_bias", False):
        b = getattr(mod, "gate_up_proj_bias", None)
        if b is None:
            b = getattr(mod, "up_proj_bias")
        h = h + b[e].double()
    if not getattr(mod, "has_gate", True) or not hasattr(mod, "gate_up_proj"):
        return mod.act_fn(h)
    apply = type(mod).__dict__.get("_apply_gate")
    if apply is not None:
        return apply(mod, h)
    if getattr(mod, "is_concatenated", True):
        g, u = h.chunk(2, dim=-1)
    else:
        g, u = h[..., 0::2], h[..., 1::2]
    return mod.act_fn(g) * u


def moe_reference(model, experts_modules, run, valid, scale_after=None):
    """Per experts module: float64 sum over valid tokens of |w * C| per (e, i) slot, and routed loads.

    run() runs the model; experts' inputs are captured by plain pre-hooks. valid: [N] bool over the
    flattened rows the experts module receives. scale_after: dict module -> factor applied after experts.
    """
    seen = {}
    hs = [m.register_forward_pre_hook(lambda mod, a, k=k: seen.__setitem__(k, [t.detach() for t in a]))
          for k, m in enumerate(experts_modules)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hs:
            h.remove()
    out = []
    for k, mod in enumerate(experts_modules):
        x, idx, w = seen[k]
        E = mod.down_proj.shape[0]
        rows = []
        load = []
        for e in range(E):
            t, pos = (idx == e).nonzero(as_tuple=True)
            keep = valid[t]
            t, pos = t[keep], pos[keep]
            load.append(len(t))
            if len(t):
                c = expert_c64(mod, x[t], e) * w[t, pos].double()[:, None]
                rows.append(c.abs().sum(0))
            else:
                rows.append(None)
        m = next(r.shape[0] for r in rows if r is not None)
        rows = [torch.zeros(m, dtype=torch.float64) if r is None else r for r in rows]
        out.append((torch.cat(rows), load))
    return out
