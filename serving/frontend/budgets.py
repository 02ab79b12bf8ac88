"""Per-request budgets: a request whose cost passes one is refused before it runs, naming the field that drives
the cost and the budget (the flag an operator sets, also reported by GetModelInfo)."""

from __future__ import annotations

from serving.frontend.admission import Load
from serving.frontend.config import FrontendConfig
from serving.frontend.convert import ChatForward, Forward
from serving.frontend.status import invalid_argument


def check_budgets(forward: Forward, config: FrontendConfig) -> None:
    cost, params = forward.cost, forward.params
    count = int(params["num_images_per_prompt"])
    size = next((name for name in ("width", "height") if params.get(name) is not None), "max_pixels")
    violations = []

    def check(field: str, amount: int, unit: str, flag: str) -> bool:
        budget: int = getattr(config, flag.replace("-", "_"))
        if amount > budget:
            violations.append((field, f"needs {amount} {unit}, over the budget of {budget} (--{flag})"))
        return amount > budget

    def per_image(amount: int, budget: int) -> str:
        """The count when one image would fit the budget, else the size."""
        return "num_images_per_prompt" if count > 1 and amount // count <= budget else size

    check(
        per_image(cost.output_bytes, config.max_response_bytes),
        cost.output_bytes,
        "response bytes",
        "max-response-bytes",
    )
    # Admission admits a request alone whatever its cost: one that could never fit beside others is refused here.
    output_field = per_image(cost.output_pixels, config.max_inflight_output_pixels)
    check(output_field, cost.output_pixels, "output pixels", "max-inflight-output-pixels")
    check("input_images", cost.input_pixels, "decoded input pixels", "max-request-input-pixels")
    parts = {"prompt": cost.text_tokens, "max_input_image_side_length": cost.reference_tokens, size: cost.image_tokens}
    sample_field = max(parts, key=parts.__getitem__)  # the largest part of a sample
    if not check(sample_field, cost.sample_tokens, "transformer tokens per sample", "max-sample-tokens"):
        step_field = per_image(cost.step_tokens, config.max_step_tokens)  # a sample over budget explains the step
        check(step_field, cost.step_tokens, "transformer tokens per step", "max-step-tokens")
    check("steps", cost.total_tokens, "transformer tokens over its steps", "max-request-tokens")
    if violations:
        raise invalid_argument(violations)


def inflight_budgets(config: FrontendConfig) -> Load:
    return Load(
        pixels=config.max_inflight_input_pixels,
        step_tokens=config.max_inflight_step_tokens,
        chat_tokens=config.max_inflight_chat_tokens,
        output_pixels=config.max_inflight_output_pixels,
    )


def generation_load(forward: Forward) -> Load:
    """What an admitted generation holds against the in-flight budgets until its work has stopped."""
    cost = forward.cost
    return Load(pixels=cost.input_pixels, step_tokens=cost.step_tokens, output_pixels=cost.output_pixels)


def check_chat_budgets(forward: ChatForward, config: FrontendConfig) -> None:
    violations = []
    budget = config.max_request_input_pixels
    if forward.input_pixels > budget:
        description = f"needs {forward.input_pixels} decoded input pixels, over the budget of {budget}"
        violations.append(("messages", f"{description} (--max-request-input-pixels)"))
    cost, budget = forward.cost, config.max_chat_tokens
    if cost.total_tokens > budget:
        field = "max_new_tokens" if cost.new_tokens >= cost.prompt_tokens else "messages"
        description = (
            f"needs {cost.total_tokens} answer tokens ({cost.prompt_tokens} of prompt and images at most, "
            f"{cost.new_tokens} new), over the budget of {budget} (--max-chat-tokens)"
        )
        violations.append((field, description))
    if violations:
        raise invalid_argument(violations)
