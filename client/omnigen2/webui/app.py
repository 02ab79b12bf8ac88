"""The Gradio app: Generate, Edit, Compose and Chat tabs over one OmniGen2Client.

Image tabs call GenerateStream: each progress event moves the page's progress bar and, with previews on, shows the
current estimate; the result replaces it. Chat calls Understand and shows the answer as it streams. Every rule
(limits, defaults, validation) is the server's: its refusals come back as the page's error messages.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from omnigen2.client import DEFAULT_SERVER, OmniGen2Client
from omnigen2.errors import OmniGen2Error
from omnigen2.limits import (
    MAX_INPUT_IMAGES,
    MAX_NEW_TOKENS,
    MAX_SEQUENCE_LENGTH,
    MAX_TOP_K,
    MIN_INPUT_IMAGE_SIDE,
    MIN_MAX_PIXELS,
    MIN_TOP_P,
    RANDOM_SEEDS,
)
from omnigen2.messages import ChatTurn, GenerationResult, Progress
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.webui.settings import RANDOM_SEED, SERVER_DEFAULT, STEP_CACHES, ChatSettings, GenerationSettings

Values = dict[Any, Any]  # what Gradio hands a handler whose inputs are a set: component -> value
GalleryUpdate = tuple[list[Image.Image], str]
STARTUP_TIMEOUT_S = 15.0  # reading the served defaults at start: a missing server is said within this
# A seed field: integers, -1 for random. The browser holds numbers as doubles, exact only below 2^53: a larger seed
# would be sent as another one. The seeds the server draws stay below 2^53 too, so each can be typed back.
SEED_FIELD: dict[str, Any] = {
    "precision": 0,
    "minimum": RANDOM_SEED,
    "maximum": RANDOM_SEEDS - 1,
    "info": f"{RANDOM_SEED}: random",
}


@dataclass
class ImageTab:
    """The controls of one image tab, read back from a handler's values."""

    prompt: gr.Textbox
    images: list[gr.Image]
    settings: list[gr.components.Component]  # in GenerationSettings' field order

    def inputs(self) -> set[gr.components.Component]:
        return {self.prompt, *self.images, *self.settings}

    def read(self, values: Values) -> tuple[str, list[Image.Image], GenerationSettings]:
        images = [values[image] for image in self.images if values[image] is not None]
        settings = GenerationSettings.from_values(tuple(values[control] for control in self.settings))
        return values[self.prompt], images, settings


def run_generation(
    client: OmniGen2Client, prompt: str, images: list[Image.Image], settings: GenerationSettings, progress: gr.Progress
) -> Iterator[GalleryUpdate]:
    """Streams one generation into the gallery: previews while it runs (when asked for), then the images."""
    progress(0, desc="Queued")
    try:
        for event in client.stream(prompt, images, previews=settings.previews, **settings.options()):
            if isinstance(event, Progress):
                progress((event.step, event.total), desc="Denoising", unit="steps")
                if event.preview is not None:
                    yield [event.preview], f"Step {event.step} of {event.total} (preview)"
            else:
                yield event.images, describe(event)
    except OmniGen2Error as exc:
        raise gr.Error(str(exc)) from None


def describe(result: GenerationResult) -> str:
    timings = result.timings
    text = f"Seed **{result.seed}** · {timings['total']:.2f} s (denoise {timings['denoise']:.2f} s)"
    usage = result.usage
    if usage.output_tokens:  # a server older than usage counts none
        text += f" · {usage.text_tokens + usage.image_tokens} input, {usage.output_tokens} output tokens"
    if result.cache != "none":
        text += f" · step cache {result.cache}"
    if result.cache_note:
        text += f" ({result.cache_note})"
    if result.truncated_prompt_tokens:
        text += f" · prompt cut by {result.truncated_prompt_tokens} tokens at max_sequence_length"
    for withheld in result.withheld:
        reasons = ", ".join(f"{f.label} {f.score:.2f}" for f in withheld.findings)
        text += f" · image {withheld.index + 1} withheld by the server's safety check ({reasons})"
    return text


def _settings_panel(info: pb.ModelInfo, start: GenerationSettings, key: str) -> list[gr.components.Component]:
    """The API's generation settings, bounded by the served limits, in GenerationSettings' field order; each
    control's element id is `<tab>-<field>` (generate-seed, edit-steps, ...)."""
    limits = info.limits
    controls: dict[str, gr.components.Component] = {}

    def add(name: str, kind: type[gr.components.Component], label: str, **options: Any) -> None:
        controls[name] = kind(value=getattr(start, name), label=label, elem_id=f"{key}-{name}", **options)

    size = {
        "minimum": 0,
        "maximum": limits.max_side or None,
        "precision": 0,
        "info": f"{SERVER_DEFAULT}: server default",
    }
    guidance = {"minimum": 0.0, "maximum": limits.max_guidance_scale or 100.0, "step": 0.1}
    share = {"minimum": 0.0, "maximum": 1.0, "step": 0.05}
    with gr.Accordion("Advanced settings", open=False, elem_id=f"{key}-settings"):
        add("negative_prompt", gr.Textbox, "Negative prompt", lines=2)
        with gr.Row():
            add("width", gr.Number, "Width", **size)
            add("height", gr.Number, "Height", **size)
            add(
                "num_images_per_prompt",
                gr.Slider,
                "Images (n)",
                minimum=1,
                maximum=limits.max_images_per_prompt or 8,
                step=1,
            )
        with gr.Row():
            add("steps", gr.Slider, "Steps", minimum=1, maximum=limits.max_steps or 200, step=1)
            add("scheduler", gr.Dropdown, "Scheduler", choices=["euler", "dpmsolver"])
            add("seed", gr.Number, "Seed", **SEED_FIELD)
        with gr.Row():
            add("text_guidance_scale", gr.Slider, "Text guidance scale", **guidance)
            add("image_guidance_scale", gr.Slider, "Image guidance scale", **guidance)
        with gr.Row():
            add("cfg_start", gr.Slider, "Guidance from (cfg_range start)", **share)
            add("cfg_end", gr.Slider, "Guidance until (cfg_range end)", **share)
        with gr.Row():
            tokens = {"precision": 0, "minimum": 1, "maximum": limits.max_sequence_length or MAX_SEQUENCE_LENGTH}
            add("max_sequence_length", gr.Number, "Max sequence length", **tokens)
            pixels = {"precision": 0, "minimum": MIN_MAX_PIXELS, "maximum": limits.max_pixels or None}
            add("max_pixels", gr.Number, "Max pixels", **pixels)
            side = {"precision": 0, "minimum": MIN_INPUT_IMAGE_SIDE, "maximum": limits.max_side or None}
            add("max_input_image_side_length", gr.Number, "Max input image side", **side)
        with gr.Row():
            # The modes the server offers (one without step caching lists none: only "none" then).
            served = {STEP_CACHES.get(mode, "none") for mode in info.step_caches}
            caches = [mode for mode in ("none", "teacache", "taylorseer") if mode == "none" or mode in served]
            add("cache", gr.Dropdown, "Step cache (faster, drifts a little)", choices=caches)
            add("teacache_threshold", gr.Slider, "TeaCache threshold", minimum=0.01, maximum=1.0, step=0.01)
        with gr.Row():
            add("previews", gr.Checkbox, "Show previews (one VAE decode each)")
            add(
                "preview_every",
                gr.Number,
                "Preview every n steps",
                precision=0,
                minimum=1,
                maximum=limits.max_steps or 200,
            )
    return [controls[f.name] for f in fields(GenerationSettings)]


def _image_tab(
    client: OmniGen2Client,
    info: pb.ModelInfo,
    start: GenerationSettings,
    name: str,
    image_slots: int,
    prompt_label: str,
    check: Callable[[list[Image.Image]], None],
) -> None:
    key = name.lower()
    with gr.Row():
        with gr.Column():
            images: list[gr.Image] = []
            if image_slots:
                with gr.Row():
                    images = [
                        gr.Image(type="pil", label=f"Image {i + 1}", elem_id=f"{key}-image-{i + 1}")
                        for i in range(image_slots)
                    ]
            prompt = gr.Textbox(label=prompt_label, lines=3, elem_id=f"{key}-prompt")
            button = gr.Button(name, variant="primary", elem_id=f"{key}-button")
            settings = _settings_panel(info, start, key)
        with gr.Column():
            gallery = gr.Gallery(
                label="Result", format="png", columns=2, height=480, object_fit="contain", elem_id=f"{key}-gallery"
            )
            status = gr.Markdown(elem_id=f"{key}-status")
    tab = ImageTab(prompt, images, settings)

    def handle(values: Values, progress: gr.Progress = gr.Progress()) -> Iterator[GalleryUpdate]:  # noqa: B008
        prompt_text, inputs, chosen = tab.read(values)
        check(inputs)
        yield from run_generation(client, prompt_text, inputs, chosen, progress)

    gr.on([button.click, prompt.submit], handle, inputs=tab.inputs(), outputs=[gallery, status])


def _need_images(at_least: int, what: str) -> Callable[[list[Image.Image]], None]:
    def check(images: list[Image.Image]) -> None:
        if len(images) < at_least:
            raise gr.Error(what)

    return check


def _chat_tab(client: OmniGen2Client, info: pb.ModelInfo) -> None:
    start = ChatSettings.from_model_info(info)
    limits = info.understand_limits
    turns = gr.State([])  # the conversation as the SDK sends it: list[ChatTurn]
    chatbot = gr.Chatbot(label="Conversation", elem_id="chat-conversation", height=420)
    message = gr.MultimodalTextbox(
        placeholder="Ask about the images (attach up to 5), then Enter",
        show_label=False,
        file_types=["image"],
        file_count="multiple",
        elem_id="chat-message",
    )
    status = gr.Markdown(elem_id="chat-status")
    with gr.Accordion("Answer settings", open=False, elem_id="chat-settings"), gr.Row():
        most = limits.max_new_tokens or MAX_NEW_TOKENS
        controls = [
            gr.Slider(1, most, start.max_new_tokens, step=1, label="Max new tokens", elem_id="chat-max_new_tokens"),
            gr.Slider(
                0.0,
                2.0,
                start.temperature,
                step=0.05,
                label="Temperature",
                info="0: greedy",
                elem_id="chat-temperature",
            ),
            gr.Slider(MIN_TOP_P, 1.0, start.top_p, step=0.01, label="Top p", elem_id="chat-top_p"),
            gr.Number(
                start.top_k,
                label="Top k",
                precision=0,
                minimum=0,
                maximum=MAX_TOP_K,
                info="0: off",
                elem_id="chat-top_k",
            ),
            gr.Number(RANDOM_SEED, label="Seed", elem_id="chat-seed", **SEED_FIELD),
        ]
    clear = gr.Button("New conversation", elem_id="chat-clear")

    def answer(
        sent: dict[str, Any], history: list[ChatTurn], shown: list[dict[str, Any]], *values: Any
    ) -> Iterator[tuple[list[dict[str, Any]], list[ChatTurn], dict[str, Any] | None, str]]:
        files = [Path(path) for path in sent.get("files", [])]
        text = sent.get("text", "")
        if not text and not files:
            raise gr.Error("Type a question (and attach images to ask about them)")
        asked = [*history, ChatTurn("user", [*files, text])]
        shown = [
            *shown,
            *({"role": "user", "content": {"path": str(path)}} for path in files),
            {"role": "user", "content": text},
        ]
        reply = ""
        try:
            for piece in client.understand_stream(asked, **ChatSettings.from_values(values).options()):
                if isinstance(piece, str):
                    reply += piece
                    yield [*shown, {"role": "assistant", "content": reply}], history, None, "Answering..."
                else:
                    result = piece
        except OmniGen2Error as exc:
            raise gr.Error(str(exc)) from None
        done = [*asked, ChatTurn("assistant", [result.text])]
        summary = (
            f"{result.completion_tokens} tokens ({result.finish_reason}) · prompt {result.prompt_tokens} tokens"
            f" · seed {result.seed} · {result.seconds:.2f} s"
        )
        yield [*shown, {"role": "assistant", "content": result.text}], done, None, summary

    outputs = [chatbot, turns, message, status]
    message.submit(answer, [message, turns, chatbot, *controls], outputs)
    clear.click(lambda: ([], [], None, ""), None, outputs)


def build_app(client: OmniGen2Client, info: pb.ModelInfo, server: str, **starting_values: Any) -> gr.Blocks:
    """The page. `starting_values` (GenerationSettings fields) replace the served defaults in the panels."""
    generate_start = GenerationSettings.from_model_info(info, **starting_values)
    edit_start = GenerationSettings(**{**asdict(generate_start), "width": SERVER_DEFAULT, "height": SERVER_DEFAULT})
    most = info.limits.max_input_images or MAX_INPUT_IMAGES
    app: gr.Blocks  # Blocks.__enter__ is untyped
    with gr.Blocks(title="OmniGen2") as app:
        gr.Markdown(
            f"# OmniGen2\nServer `{server}` · backend `{info.backend}` · checkpoint `{info.checkpoint_sha256[:12]}`"
        )
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _image_tab(client, info, generate_start, "Generate", 0, "Prompt", _need_images(0, ""))
            with gr.Tab("Edit", id="edit"):
                need = _need_images(1, "Upload the image to edit")
                _image_tab(client, info, edit_start, "Edit", 1, "Instruction", need)
            with gr.Tab("Compose", id="compose"):
                need = _need_images(1, "Upload at least one image")
                prompt = "Prompt (refer to the images: 'the cat of image 1 on the sofa of image 2')"
                _image_tab(client, info, generate_start, "Compose", most, prompt, need)
            with gr.Tab("Chat", id="chat"):
                _chat_tab(client, info)
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnigen2-webui", description="The OmniGen2 web UI (Gradio)")
    parser.add_argument("--server", default=os.environ.get("OMNIGEN2_SERVER", DEFAULT_SERVER), help="API host:port")
    parser.add_argument("--token", default=os.environ.get("OMNIGEN2_TOKEN"), help="bearer token (env OMNIGEN2_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="TLS, verifying the server against the system's CAs")
    parser.add_argument("--tls-ca", type=Path, help="TLS, trusting this PEM root certificate")
    parser.add_argument(
        "--allow-plaintext-token",
        action="store_true",
        help="send --token without TLS to a server not on this machine (readable on the network; refused otherwise)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per generation or answer")
    parser.add_argument("--host", default="127.0.0.1", help="address the page is served on")
    parser.add_argument("--port", type=int, default=7860)
    # Starting values of the panels (the server's defaults otherwise), e.g. small and fast on a CPU.
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    tls: bool | bytes = args.tls_ca.read_bytes() if args.tls_ca else args.tls
    connection: dict[str, Any] = {"token": args.token, "tls": tls, "allow_plaintext_token": args.allow_plaintext_token}
    try:
        with OmniGen2Client(args.server, timeout=STARTUP_TIMEOUT_S, **connection) as probe:
            info = probe.info()
    except ValueError as exc:  # --server not host:port, or a token that would go in cleartext
        raise SystemExit(f"omnigen2-webui: {exc}") from None
    except OmniGen2Error as exc:
        message = f"omnigen2-webui: no OmniGen2 API at {args.server} ({exc}); start one with `make serve`"
        raise SystemExit(message) from None
    client = OmniGen2Client(args.server, timeout=args.timeout, **connection)
    app = build_app(client, info, args.server, width=args.width, height=args.height, steps=args.steps)
    print(f"OmniGen2 web UI on http://{args.host}:{args.port} (API {args.server})", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, show_error=True, quiet=True)
