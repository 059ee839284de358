"""The strictness rule every conversion shares: each Keras weight gets exactly one source tensor
of the right shape, and every other tensor of the checkpoint is skipped by a named rule.

The plan of a conversion (which keys feed which weights) is the converter's own; this module
only judges it against the checkpoint, so ResNet/RegNet and ViT conversions fail with the same
message naming the keys at fault.
"""

LIST_LIMIT = 8  # keys named in a message; the rest are counted


def listing(label, items):
    """"3 missing keys: a, b, c" (at most LIST_LIMIT names, then "(+N more)")."""
    items = list(items)
    more = f" (+{len(items) - LIST_LIMIT} more)" if len(items) > LIST_LIMIT else ""
    return f"{len(items)} {label}: {', '.join(items[:LIST_LIMIT])}{more}"


def problems_of(state, used, missing, bad_shapes, skip_reason):
    """Judges a conversion plan against the checkpoint's tensors.

    Args:
      state: {key: array} of the checkpoint (after the layout's prefix is chosen).
      used: the source keys the plan reads, in plan order (a key twice = one tensor feeding
        two weights).
      missing: keys the plan needs that `state` lacks.
      bad_shapes: one text per ill-shaped tensor ("key [shape] -> weight expects [shape]").
      skip_reason: key -> the named rule that skips it, or None.
    Returns:
      (problems: list of texts, empty when the plan fits; skipped: {key: rule}).
    """
    used_set = set(used)
    skipped, unexpected = {}, []
    for key in state:
        if key in used_set:
            continue
        reason = skip_reason(key)
        if reason is None:
            unexpected.append(key)
        else:
            skipped[key] = reason
    problems = []
    if missing:
        problems.append(listing("missing keys", missing))
    if bad_shapes:
        problems.append(listing("ill-shaped tensors", bad_shapes))
    if unexpected:
        problems.append(listing("unexpected tensors (no rule skips them)", unexpected))
    if len(used_set) != len(list(used)):
        problems.append("a source tensor would feed two Keras weights")
    return problems, skipped
