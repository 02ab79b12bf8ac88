"""Per-request budgets: a request whose cost passes one is refused before it runs, naming the field and the budget."""

from __future__ import annotations

from serving.frontend.convert import Forward
from serving.frontend.status import invalid_argument


def check_budgets(forward: Forward, max_output_bytes: int) -> None:
    violations = []
    cost, params = forward.cost, forward.params
    if cost.output_bytes > max_output_bytes:
        count = int(params["num_images_per_prompt"])
        if count > 1 and cost.output_bytes // count <= max_output_bytes:
            field = "num_images_per_prompt"
        else:
            field = next((name for name in ("width", "height") if params.get(name) is not None), "max_pixels")
        violations.append(
            (field, f"the output takes {cost.output_bytes} bytes, over the {max_output_bytes}-byte response budget")
        )
    if violations:
        raise invalid_argument(violations)
