"""`omnigen2`: generate, edit and compose images (with a progress bar) and ask about images (streamed).

omnigen2 generate "A red apple on a wooden table" -o apple.png
omnigen2 edit apple.png "Make the apple green" -o green.png
omnigen2 compose cat.png sofa.png --prompt "The cat from image 1 sleeping on the sofa of image 2"
omnigen2 understand apple.png "What colour is the apple?"
omnigen2 info

Without -o, images go to omnigen2.png in the current folder, or to the first of omnigen2-1.png, omnigen2-2.png, ...
that is free: a default name never replaces an earlier image. An -o file is written over, as named.
Exit status: 0 done, 1 the call failed (server, network), 2 a usage error (arguments, input files, a value the
server refused as invalid), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from google.protobuf import json_format
from tqdm import tqdm

from omnigen2.client import DEFAULT_PORT, DEFAULT_SERVER, OmniGen2Client
from omnigen2.errors import FieldViolation, InvalidArgumentError, OmniGen2Error, UnavailableError
from omnigen2.limits import MIN_TEMPERATURE
from omnigen2.messages import GenerationOptions, GenerationResult, ImageInput, Progress, UnderstandOptions

DEFAULT_OUTPUT = Path("omnigen2.png")
_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _count(text: str) -> int:
    """An integer 0 or more (argparse names the option in its error)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _output(text: str) -> Path:
    """-o's file; its suffix picks the format (argparse names the option in its error, exit status 2)."""
    path = Path(text)
    if path.suffix.lower() not in _FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r} must end in one of {', '.join(_FORMATS)} (the image format)")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnigen2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("OMNIGEN2_SERVER", DEFAULT_SERVER),
        help=f"host:port (port default {DEFAULT_PORT}; default {DEFAULT_SERVER}); several replicas as "
        "host:port,host:port or dns:///name:port, balanced round-robin with failover of UNAVAILABLE "
        "(env OMNIGEN2_SERVER)",
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
    parser.add_argument(
        "--allow-plaintext-token",
        action="store_true",
        help="send the token without TLS to a server not on this machine (readable on the network; refused, exit "
        "status 2, otherwise)",
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
    parser.add_argument(
        "-o",
        "--output",
        type=_output,
        help=f"image file, written over if it exists; .png, .jpg, .jpeg or .webp (the format). Default: "
        f"{DEFAULT_OUTPUT}, or omnigen2-1.png, ... if taken (never written over). With -n > 1: out-0.png, ...",
    )
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


def _typed_options(
    args: argparse.Namespace, options: type[GenerationOptions] | type[UnderstandOptions]
) -> dict[str, Any]:
    """The flags `options` names that were given: the rest are left to the server's defaults."""
    return {k: v for k, v in vars(args).items() if k in options.__annotations__ and v is not None}


def _options(args: argparse.Namespace, output: Path) -> GenerationOptions:
    values = _typed_options(args, GenerationOptions)
    if "cfg_range" in values:
        values["cfg_range"] = tuple(values["cfg_range"])
    values["output_format"] = _FORMATS[output.suffix.lower()]
    return cast(GenerationOptions, values)  # argparse's choices and types made the values the options' own


def _outputs(output: Path, count: int) -> list[Path]:
    """The files `count` images are written to: `output` for one, out-0.png, out-1.png, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _free_outputs(count: int | None) -> Iterator[Path]:
    """The default outputs, numbered past the files earlier runs left: of omnigen2.png, omnigen2-1.png, ... those
    none of whose files (the numbered ones too, for several images) exists when it is reached."""
    for number in itertools.count():
        output = DEFAULT_OUTPUT.with_stem(f"{DEFAULT_OUTPUT.stem}-{number}") if number else DEFAULT_OUTPUT
        if not any(path.exists() for path in [output, *_outputs(output, count or 1)]):
            yield output


def _write_new(output: Path, names: Iterator[Path], encoded: list[bytes]) -> list[Path]:
    """Writes default-named images into files it creates (mode "xb"), never over one: another run in this folder may
    have taken `output` since it was picked, and then its images go to the next free name of `names`, all of them."""
    while True:
        outputs, created = _outputs(output, len(encoded)), []
        try:
            for path, data in zip(outputs, encoded, strict=True):
                with path.open("xb") as file:
                    created.append(path)
                    file.write(data)
            return outputs
        except FileExistsError:
            for path in created:
                path.unlink()  # this run's own, so that one name holds all of its images
            output = next(names)


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
    names = _free_outputs(args.num_images_per_prompt)
    output = args.output or next(names)
    _check_outputs(output, args.num_images_per_prompt)
    result: GenerationResult | None = None
    bar: tqdm[None] | None = None
    try:
        for event in client.stream(prompt, images, **_options(args, output)):
            if isinstance(event, Progress):
                bar = bar or tqdm(total=event.total, unit="step", desc="denoising", disable=args.quiet)
                bar.update(event.step - bar.n)
            else:
                result = event
    finally:
        if bar is not None:
            bar.close()
    assert result is not None  # a stream ends with its result or raises
    # The server's encoding, byte for byte; no file when the server withheld every image.
    if args.output:
        outputs = _outputs(output, len(result.encoded))
        for path, data in zip(outputs, result.encoded, strict=True):
            path.write_bytes(data)
    else:
        outputs = _write_new(output, names, result.encoded)
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if v)
    usage = result.usage
    tokens = f"{usage.text_tokens} text + {usage.image_tokens} image -> {usage.output_tokens} output tokens; "
    tokens = tokens if usage.output_tokens else ""  # a server older than usage counts none
    written = ", ".join(map(str, outputs)) or "no image (all withheld)"
    print(f"wrote {written} (seed {result.seed}; {tokens}{timings}; served by {result.served_by})")
    if result.truncated_prompt_tokens or result.truncated_negative_prompt_tokens:
        cut = f"{result.truncated_prompt_tokens} prompt, {result.truncated_negative_prompt_tokens} negative prompt"
        print(f"tokens cut at --max-sequence-length: {cut}", file=sys.stderr)
    for withheld in result.withheld:
        why = ", ".join(f"{f.label} {f.score:.2f} (threshold {f.threshold:g})" for f in withheld.findings)
        print(f"image {withheld.index} withheld by the server's safety classifier: {why}", file=sys.stderr)
    if result.cache_note:
        print(f"step caching: {result.cache_note}", file=sys.stderr)
    return 0


# How each finish reason reads in the footer.
_FINISHED = {
    "stop": "answer complete",
    "length": "cut off at --max-new-tokens",
    "stop_string": "stopped at a --stop string",
}


def _understand(client: OmniGen2Client, args: argparse.Namespace) -> int:
    options = cast(UnderstandOptions, _typed_options(args, UnderstandOptions))
    # The server's default temperature is 0; below MIN_TEMPERATURE it decodes greedily and draws nothing from the seed.
    sampled = (args.temperature or 0.0) >= MIN_TEMPERATURE
    mid_line = False  # text printed since the last newline
    try:
        for item in client.understand_stream(args.question, args.images, **options):
            if isinstance(item, str):
                print(item, end="", flush=True)
                mid_line = mid_line or bool(item)
            else:
                print()
                mid_line = False
                parts = [
                    _FINISHED.get(item.finish_reason, item.finish_reason),
                    f"{item.prompt_tokens} prompt + {item.completion_tokens} answer tokens",
                    *([f"seed {item.seed}"] if sampled else []),
                    f"{item.seconds:.2f}s",
                    f"served by {item.served_by}",
                ]
                print(f"({'; '.join(parts)})", file=sys.stderr)
    finally:
        if mid_line:  # an interrupted or failed answer: the error starts a line of its own
            print(flush=True)
    return 0


_IMAGE_FIELD = re.compile(r"input_images\[(\d+)\](?:\.data)?|messages\[0\]\.content\[(\d+)\](?:\.image(?:\.data)?)?")


def _named(violation: FieldViolation, args: argparse.Namespace) -> str:
    """The field a violation names as the user gave it: an input image by its file (a str question follows the
    images in its message, so content[i] below their count is the i-th), an option by its flag."""
    images: list[Path] = [args.image] if args.command == "edit" else getattr(args, "images", [])
    found = _IMAGE_FIELD.fullmatch(violation.field)
    if found:
        index = int(found.group(1) or found.group(2))
        if index < len(images):
            return f"image {images[index]}"
    if violation.field != "prompt" and violation.field in vars(args):
        return "--" + violation.field.replace("_", "-")
    return violation.field


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tls: bool | bytes = Path(args.tls_ca).read_bytes() if args.tls_ca else args.tls
        client = OmniGen2Client(
            args.server,
            timeout=args.timeout,
            retries=args.retries,
            token=args.token,
            tls=tls,
            allow_plaintext_token=args.allow_plaintext_token,
        )
        with client:
            if args.command == "info":
                print(json_format.MessageToJson(client.info()))
                return 0
            if args.command == "understand":
                return _understand(client, args)
            images: list[ImageInput] = [args.image] if args.command == "edit" else getattr(args, "images", [])
            return _generate(client, args.prompt, images, args)
    except InvalidArgumentError as exc:  # the server's refusal of a value given: a usage error
        for violation in exc.violations:
            print(f"omnigen2: invalid {_named(violation, args)}: {violation.description}", file=sys.stderr)
        return 2
    except UnavailableError as exc:
        print(f"omnigen2: {exc}", file=sys.stderr)
        if exc.unreachable:
            print("omnigen2: give the address with --server host:port or in OMNIGEN2_SERVER", file=sys.stderr)
        return 1
    except OmniGen2Error as exc:
        print(f"omnigen2: {exc}", file=sys.stderr)
        return 1
    # A --server that is not host:port, a token that would go in cleartext; an input image or --tls-ca that cannot be
    # read, an output not writable.
    except (ValueError, OSError) as exc:
        print(f"omnigen2: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omnigen2: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
