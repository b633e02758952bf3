"""The search's variables: coefficient groups, the names of the variables a sampler
sees, and the mapping between a trial's values and a recipe, both ways.

A variable is named ``<parameter>[/m<model>][/<group>]`` (:func:`var_name`): ``weight/m0/L0-1``
is model 0's weight on the group of layers 0-1, ``lambda`` a global parameter. A depth
schedule (``granularity: {level: depth}``) gives each parameter two variables instead,
``<parameter>[/m<model>]/alpha`` and ``.../beta``: the value at layer l of L is
alpha + beta * l / (L - 1) (LiNeS), clipped into the parameter's bounds. Groups
are tensor-name filters (:class:`Group`): :func:`make_groups` builds them for a
granularity, :func:`tensor_groups` one per tensor, :func:`group_index` finds a
tensor's group as a recipe's filter list resolves it, and :func:`group_setting` turns
one value per group into that filter list. Everything that builds or counts variable
names goes through this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from mergesearch.methods import REGISTRY
from mergesearch.recipe import Recipe, from_dict, layer_index, layer_position
from mergesearch.search.schema import Bounds, Granularity

if TYPE_CHECKING:
    from mergesearch.search.space import SearchSpace


def var_name(parameter: str, owner: str = "", group: str = "") -> str:
    """A variable's name: the parameter, its model (``m<i>``, none for a global one) and its group."""
    return "/".join(x for x in (parameter, owner, group) if x)


def n_variables(space: SearchSpace, groups: list[Group]) -> int:
    """How many variables the sampler sees: one per searched global parameter, one per
    model and group for a searched per-model parameter, and the method when there are several."""
    n = 0
    for name, b in space.parameters.items():
        if isinstance(b, Bounds):
            scope = next(s.param(name).scope for s in map(REGISTRY.__getitem__, space.methods) if s.param(name))
            n += len(space.models) * len(groups) if scope == "model" else len(scope_groups(scope, groups))
    return n + (1 if len(space.methods) > 1 else 0)


def scope_groups(scope: str, groups: list[Group]) -> list[Group]:
    """The groups a parameter of ``scope`` takes a value on: all of them for a per-model
    parameter; for a global one the whole model, or both of a depth schedule's variables."""
    if scope == "model" or is_depth(groups):
        return groups
    return [groups[0].as_whole()]


def is_depth(groups: list[Group]) -> bool:
    return bool(groups) and groups[0].depth > 0


def depth_setting(alpha: float, beta: float, bounds: Bounds, num_layers: int):
    """A depth schedule as a recipe setting: the gradient [alpha, alpha + beta] (mergekit's
    own form), or one value per layer where the line leaves the bounds and is clipped."""
    ends = (alpha, alpha + beta)
    if all(bounds.low <= v <= bounds.high for v in ends):
        return list(ends)
    return [min(max(alpha + beta * k / (num_layers - 1), bounds.low), bounds.high) for k in range(num_layers)]


def group_index(name: str, groups: list[dict]) -> int:
    """The coefficient group of a tensor, as a recipe's filter list resolves it: the first
    group with a matching filter, then the groups' fallbacks, then the default group."""
    for k, g in enumerate(groups):
        if any(f in name for f in g["filters"]):
            return k
    for k, g in enumerate(groups):
        if any(f in name for f in g.get("fallback", [])):
            return k
    return next(k for k, g in enumerate(groups) if g.get("default"))


def group_setting(groups: list[dict], values: list[float]):
    """A per-group value as a recipe parameter (a filter list), or a scalar for one group."""
    if len(groups) == 1:
        return values[0]
    setting = [{"filter": f, "value": v} for g, v in zip(groups, values) for f in g["filters"]]
    setting += [{"filter": f, "value": v} for g, v in zip(groups, values) for f in g.get("fallback", [])]
    setting.append({"value": values[next(k for k, g in enumerate(groups) if g.get("default"))]})
    return setting


@dataclass
class Group:
    """A set of tensors sharing one coefficient: the tensor-name filters that select it."""

    name: str
    filters: list[str]
    default: bool = False  # takes tensors no filter matches
    fallback: list[str] = field(default_factory=list)  # filters tried after every group's own
    depth: int = 0  # a depth schedule's variable (alpha or beta) over this many layers

    def as_whole(self) -> "Group":
        return Group("", [], True)


def make_groups(g: Granularity, num_layers: int, prefix: str) -> list[Group]:
    if g.level == "model":
        return [Group("", [], True)]
    if g.level == "depth":
        # two variables per parameter, not tensor filters: every tensor takes the schedule
        return [Group("alpha", [], True, depth=num_layers), Group("beta", [], depth=num_layers)]
    n = num_layers if g.level == "layer" else min(g.n_groups, num_layers)
    groups: list[Group] = []
    if g.special:
        groups += [Group("embed", ["embed_tokens"]), Group("lm_head", ["lm_head"]), Group("norm", ["model.norm."])]
    for k in range(n):
        layers = [i for i in range(num_layers) if i * n // num_layers == k]
        label = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
        if g.modules:
            for mod in g.modules:
                key = "self_attn" if mod == "attn" else "mlp"
                groups.append(Group(f"{label}.{mod}", [f"{prefix}{i}.{key}" for i in layers]))
            # the rest of each layer (its norms) follows the group's first module
            groups[-len(g.modules)].fallback = [f"{prefix}{i}." for i in layers]
        else:
            groups.append(Group(label, [f"{prefix}{i}." for i in layers]))
    first_layer_group = 3 if g.special else 0
    groups[first_layer_group].default = True
    return groups


def tensor_groups(names: list[str], special: bool = True) -> list[Group]:
    """One coefficient group per tensor (its full name as the filter), the finest level
    a recipe can express; embed_tokens, lm_head and the final norm first, as in
    :func:`make_groups`."""
    groups: list[Group] = []
    rest = list(names)
    if special:
        for label, key in (("embed", "embed_tokens"), ("lm_head", "lm_head"), ("norm", "model.norm.")):
            mine = [n for n in rest if key in n]
            if mine:
                groups.append(Group(label, mine))
                rest = [n for n in rest if key not in n]
    first = len(groups)
    groups += [Group(n, [n]) for n in rest]
    groups[first if first < len(groups) else 0].default = True
    return groups


def layer_prefix(names: list[str]) -> str:
    """The tensor-name prefix of the transformer blocks (``model.layers.``)."""
    for n in names:
        i = layer_index(n)
        if i is not None:
            return n[: n.index(f".{i}.") + 1]
    return "model.layers."


def suggest(space: SearchSpace, trial, groups: list[Group], side: dict | None = None) -> Recipe:
    """Ask the trial for every variable; returns the Recipe. ``side`` holds the
    resolved metric and Gram files (:func:`mergesearch.search.side_inputs.resolve_side_inputs`)."""
    method = space.methods[0] if len(space.methods) == 1 else trial.suggest_categorical("method", space.methods)
    spec = REGISTRY[method]
    models = []
    for i, path in enumerate(space.models):
        params = {}
        for p in spec.model_params:
            if p.name in space.parameters:
                params[p.name] = _value(space, trial, p.name, f"m{i}", groups)
        entry = {"path": path, "parameters": params}
        if side and spec.needs_metric != "no" and side["metrics"].get(path):
            entry["metric"] = side["metrics"][path]
        if side and spec.needs_gram:
            entry["gram"] = side["grams"][path]
        models.append(entry)
    global_params = {}
    for p in spec.global_params:
        if p.name in space.parameters:
            global_params[p.name] = _value(space, trial, p.name, "", scope_groups("global", groups))
    recipe = {"method": method, "base": space.base, "models": models, "parameters": global_params,
              "seed": space.seed}
    if side and spec.name == "gradient_matching" and side.get("base_metric"):
        recipe["base_metric"] = side["base_metric"]
    if space.dtype:
        recipe["dtype"] = space.dtype
    return from_dict(recipe, "search trial")


def soup_params(space: SearchSpace, members: list[str], groups: list[Group]) -> dict | None:
    """The trial parameters under which this space proposes the uniform soup of
    ``members`` (a subset of its models), or None when it cannot express it.

    A uniform soup puts weight 1/k on each of its k members. ``linear`` reaches it
    with equal weights and ``normalize`` (or weights 1/k without); task
    arithmetic with lambda * weight = 1/k (or equal weights, lambda 1 and
    ``normalize``), since base + sum (theta_i - base) / k = sum theta_i / k.
    Non-members need weight 0 in the bounds. Sparsifying methods are not exact.
    """
    from mergesearch.sources import key
    keys = [key(m) for m in space.models]
    try:
        idx = {keys.index(key(m)) for m in members}
    except ValueError:
        return None
    k = len(idx)
    for method in space.methods:
        if method not in ("linear", "task_arithmetic"):
            continue
        spec = REGISTRY[method]
        normalize = space.parameters.get("normalize", spec.param("normalize").default)
        weight = space.parameters.get("weight", 1.0)
        lam = space.parameters.get("lambda", 1.0) if method == "task_arithmetic" else 1.0
        fits = (lambda b, v: (b.low <= v <= b.high) if isinstance(b, Bounds) else abs(b - v) < 1e-12)
        choice = None
        # (lambda, member weight) pairs to try, simplest first
        lams = [1.0] + ([lam.low, lam.high] if isinstance(lam, Bounds) else [lam])
        for L in lams:
            if L <= 0 or not fits(lam, L):
                continue
            if normalize:
                if L != 1.0:
                    continue
                cands = [1.0] + ([weight.high] if isinstance(weight, Bounds) else [weight])
                w = next((v for v in cands if v > 0 and fits(weight, v)), None)
            else:
                w = 1.0 / (k * L)
                w = w if fits(weight, w) else None
            if w is not None:
                choice = (L, w)
                break
        if choice is None or (k < len(space.models) and not fits(weight, 0.0)):
            continue
        L, w = choice
        params: dict = {}
        if len(space.methods) > 1:
            params["method"] = method
        if isinstance(weight, Bounds):
            for i in range(len(space.models)):
                for g in groups:
                    on = i in idx and g.name != "beta"  # a depth schedule's slope is 0
                    params[var_name("weight", f"m{i}", g.name)] = w if on else 0.0
        if isinstance(lam, Bounds):
            for g in scope_groups("global", groups):
                params[var_name("lambda", "", g.name)] = 0.0 if g.name == "beta" else L
        return params
    return None


def _value(space: SearchSpace, trial, name: str, owner: str, groups: list[Group]):
    bounds = space.parameters[name]
    if not isinstance(bounds, Bounds):
        return bounds
    if is_depth(groups):
        alpha = trial.suggest_float(var_name(name, owner, "alpha"), bounds.low, bounds.high, log=bounds.log)
        span = bounds.high - bounds.low
        beta = trial.suggest_float(var_name(name, owner, "beta"), -span, span)
        return depth_setting(alpha, beta, bounds, groups[0].depth)
    values = [trial.suggest_float(var_name(name, owner, g.name), bounds.low, bounds.high, log=bounds.log)
              for g in groups]
    return group_setting([asdict(g) for g in groups], values)


def recipe_x0(space: SearchSpace, recipe: dict, groups, tensor_names: list[str], num_layers: int) -> dict[str, float]:
    """A start point in ``groups``' variables from any recipe (a trial of a coarser stage,
    a baseline): each variable takes the recipe's value at a tensor of its group, else
    the parameter's default, clipped into its bounds. For a recipe of a coarser, nested
    granularity this is the same merge."""
    r = from_dict(recipe, "start point")
    spec = REGISTRY[space.methods[0]]
    gd = [asdict(g) for g in groups]
    first: dict[int, str] = {}
    for n in tensor_names:
        first.setdefault(group_index(n, gd), n)
    x0 = {}
    if is_depth(groups):
        return _depth_x0(space, r, spec, tensor_names, num_layers)
    for name, b in space.parameters.items():
        if not isinstance(b, Bounds):
            continue
        p = spec.param(name)
        default = p.default if not p.required else 1.0
        owners = [("", 0)] if p.scope == "global" else [(f"m{i}", i) for i in range(len(space.models))]
        for owner, i in owners:
            for k, g in enumerate(groups if p.scope == "model" else groups[:1]):
                tensor = first.get(k, tensor_names[0])
                glob, per = r.resolve(tensor, layer_position(tensor, num_layers))
                src = glob if p.scope == "global" else (per[i] if i < len(per) else {})
                v = src.get(name, default)
                v = v if isinstance(v, (int, float)) and not isinstance(v, bool) else default
                var = var_name(name, owner, g.name if p.scope == "model" else "")
                x0[var] = min(max(float(v), b.low), b.high)
    return x0


def _depth_x0(space: SearchSpace, r: Recipe, spec, tensor_names: list[str], num_layers: int) -> dict[str, float]:
    """A depth schedule's start from any recipe: alpha is its value at the first layer,
    beta the rise to the last one (a recipe of whole-model values starts flat)."""
    layered = {layer_index(n): n for n in tensor_names if layer_index(n) is not None}
    first, last = (layered[min(layered)], layered[max(layered)]) if layered else (tensor_names[0],) * 2
    ends = [r.resolve(t, layer_position(t, num_layers)) for t in (first, last)]  # (global, per model) each
    x0 = {}
    for name, b in space.parameters.items():
        if not isinstance(b, Bounds):
            continue
        p = spec.param(name)
        default = p.default if not p.required else 1.0
        owners = [("", None)] if p.scope == "global" else [(f"m{i}", i) for i in range(len(space.models))]
        span = b.high - b.low
        for owner, i in owners:
            vals = []
            for glob, per in ends:
                src = glob if i is None else (per[i] if i < len(per) else {})
                v = src.get(name, default)
                vals.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float(default))
            alpha = min(max(vals[0], b.low), b.high)
            x0[var_name(name, owner, "alpha")] = alpha
            x0[var_name(name, owner, "beta")] = min(max(vals[1] - alpha, -span), span)
    return x0
