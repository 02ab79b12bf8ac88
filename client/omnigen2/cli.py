"""`omnigen2`: generate, edit and compose images (with a progress bar) and ask about images (streamed).

omnigen2 generate "A red apple on a wooden table" -o apple.png
omnigen2 edit apple.png "Make the apple green" -o green.png
omnigen2 compose cat.png sofa.png --prompt "The cat from image 1 sleeping on the sofa of image 2"
omnigen2 understand apple.png "What colour is the apple?"
omnigen2 info
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from tqdm import tqdm

from omnigen2.client import DEFAULT_SERVER, OmniGen2Client
from omnigen2.errors import InvalidArgumentError, OmniGen2Error
from omnigen2.messages import GenerationOptions, GenerationResult, ImageInput, Progress, UnderstandOptions


def _count(text: str) -> int:
    """An integer 0 or more (argparse names the option in its error)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnigen2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("OMNIGEN2_SERVER", DEFAULT_SERVER),
        help="host:port; several replicas as host:port,host:port or dns:///name:port, balanced round-robin with "
        "failover of UNAVAILABLE (env OMNIGEN2_SERVER)",
    )
    parser.add_argument(
        "--retries", type=_count, default=4, help="attempts after UNAVAILABLE, on another replica (0: none)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per call")
    parser.add_argument("--token", default=os.environ.get("OMNIGEN2_TOKEN"), help="bearer token (env OMNIGEN2_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="TLS, verifying the server against the system's CAs")
    parser.add_argument(
        "--tls-ca", type=Path, default=os.environ.get("OMNIGEN2_TLS_CA"), help="TLS, trusting this PEM root certificate"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="text to image")
    generate.add_argument("prompt")
    edit = commands.add_parser("edit", help="edit one image by an instruction")
    edit.add_argument("image", type=Path)
    edit.add_argument("prompt", metavar="instruction")
    compose = commands.add_parser("compose", help="a new image from up to 5 input images")
    compose.add_argument("images", type=Path, nargs="+")
    compose.add_argument("--prompt", required=True)
    for command in (generate, edit, compose):
        _generation_flags(command)
    understand = commands.add_parser("understand", help="answer a question about images, printed as it arrives")
    understand.add_argument("images", type=Path, nargs="*", help="image files (none: a text-only question)")
    understand.add_argument("question")
    understand.add_argument("--max-new-tokens", type=int)
    understand.add_argument("--temperature", type=float, help="0 (the default): greedy")
    understand.add_argument("--top-p", type=float)
    understand.add_argument("--top-k", type=int)
    understand.add_argument("--seed", type=int)
    understand.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    commands.add_parser("info", help="the served model, its limits and defaults")
    return parser


def _generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=Path("omnigen2.png"), help="with -n > 1: out-0.png, ...")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--text-guidance-scale", type=float)
    parser.add_argument("--image-guidance-scale", type=float)
    parser.add_argument("--cfg-range", type=float, nargs=2, metavar=("START", "END"))
    parser.add_argument("--scheduler", choices=("euler", "dpmsolver"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("-n", "--num-images-per-prompt", type=int)
    parser.add_argument("--max-pixels", type=int)
    parser.add_argument("--max-input-image-side-length", type=int)
    parser.add_argument("--max-sequence-length", type=int, help="prompt tokens kept, chat template included")
    parser.add_argument("--quality", type=int, help="JPEG / WEBP quality (the format follows --output's suffix)")
    parser.add_argument("--cache", choices=("none", "teacache", "taylorseer"), help="step caching (default none)")
    parser.add_argument("--teacache-threshold", type=float, help="TeaCache: in (0, 1], default 0.05; larger is faster")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_OPTION_NAMES = set(GenerationOptions.__annotations__)


def _options(args: argparse.Namespace) -> GenerationOptions:
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k in _OPTION_NAMES and v is not None}
    if "cfg_range" in values:
        values["cfg_range"] = tuple(values["cfg_range"])
    suffix = args.output.suffix.lower()
    if suffix not in _FORMATS:
        raise SystemExit(f"omnigen2: --output must end in one of {', '.join(_FORMATS)}")
    values["output_format"] = _FORMATS[suffix]
    return GenerationOptions(**values)  # type: ignore[typeddict-item]


def _outputs(output: Path, count: int) -> list[Path]:
    """The files `count` images are written to: `output` for one, out-0.png, out-1.png, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _check_outputs(output: Path, count: int | None) -> None:
    """Every file the call may write, said before the images are paid for, not after: -o and, for several images,
    each numbered one (one image may be left of several when the server withholds the others)."""
    folder = output.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OSError(f"cannot write {output}: {folder} is not a folder this user can write to")
    for path in dict.fromkeys([output, *_outputs(output, count or 1)]):  # the server's default is one image
        if path.is_dir():
            raise OSError(f"cannot write {path}: it is a folder")
        if path.exists() and not os.access(path, os.W_OK):
            raise OSError(f"cannot write {path}: this user cannot write to it")


def _generate(client: OmniGen2Client, prompt: str, images: list[ImageInput], args: argparse.Namespace) -> int:
    _check_outputs(args.output, args.num_images_per_prompt)
    result: GenerationResult | None = None
    bar: tqdm[None] | None = None
    try:
        for event in client.stream(prompt, images, **_options(args)):
            if isinstance(event, Progress):
                bar = bar or tqdm(total=event.total, unit="step", desc="denoising", disable=args.quiet)
                bar.update(event.step - bar.n)
            else:
                result = event
    finally:
        if bar is not None:
            bar.close()
    assert result is not None  # a stream ends with its result or raises
    outputs = _outputs(args.output, len(result.encoded))  # none when the server withheld them all
    for path, data in zip(outputs, result.encoded, strict=True):
        path.write_bytes(data)  # the server's encoding, byte for byte
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if v)
    usage = result.usage
    tokens = f"{usage.text_tokens} text + {usage.image_tokens} image -> {usage.output_tokens} output tokens; "
    tokens = tokens if usage.output_tokens else ""  # a server older than usage counts none
    print(f"wrote {', '.join(map(str, outputs))} (seed {result.seed}; {tokens}{timings}; served by {result.served_by})")
    if result.truncated_prompt_tokens or result.truncated_negative_prompt_tokens:
        cut = f"{result.truncated_prompt_tokens} prompt, {result.truncated_negative_prompt_tokens} negative prompt"
        print(f"tokens cut at --max-sequence-length: {cut}", file=sys.stderr)
    for withheld in result.withheld:
        why = ", ".join(f"{f.label} {f.score:.2f} (threshold {f.threshold:g})" for f in withheld.findings)
        print(f"image {withheld.index} withheld by the server's safety classifier: {why}", file=sys.stderr)
    if result.cache_note:
        print(f"step caching: {result.cache_note}", file=sys.stderr)
    return 0


def _understand(client: OmniGen2Client, args: argparse.Namespace) -> int:
    names = set(UnderstandOptions.__annotations__)
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for item in client.understand_stream(args.question, args.images, **UnderstandOptions(**values)):  # type: ignore[typeddict-item]
        if isinstance(item, str):
            print(item, end="", flush=True)
        else:
            print()
            usage = f"{item.prompt_tokens} prompt + {item.completion_tokens} completion tokens"
            where = f"served by {item.served_by}"
            print(f"({item.finish_reason}; {usage}; seed {item.seed}; {item.seconds:.2f}s; {where})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tls: bool | bytes = Path(args.tls_ca).read_bytes() if args.tls_ca else args.tls
        client = OmniGen2Client(args.server, timeout=args.timeout, retries=args.retries, token=args.token, tls=tls)
        with client:
            if args.command == "info":
                print(json_format.MessageToJson(client.info()))
                return 0
            if args.command == "understand":
                return _understand(client, args)
            images: list[ImageInput] = [args.image] if args.command == "edit" else getattr(args, "images", [])
            return _generate(client, args.prompt, images, args)
    except InvalidArgumentError as exc:
        for violation in exc.violations:
            print(f"omnigen2: invalid {violation.field}: {violation.description}", file=sys.stderr)
        return 2
    except OmniGen2Error as exc:
        print(f"omnigen2: {exc}", file=sys.stderr)
        return 1
    # A --server that is not host:port; an input image or --tls-ca that cannot be read, an output not written.
    except (ValueError, OSError) as exc:
        print(f"omnigen2: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omnigen2: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
