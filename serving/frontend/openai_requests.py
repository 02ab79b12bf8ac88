"""OpenAI request bodies -> the API's protobuf messages (the answers back: openai_answers.py).

Only shapes and JSON types are checked here (a string where a number belongs, a field the route does not take):
every limit (sizes, steps, counts, guidance, image headers, request bytes) is the gRPC service's, and the fields
its refusals name are renamed back to the HTTP caller's names by `Names`. The OmniGen2 settings go by their gRPC
names, found from the message descriptors, so a field added to the proto is taken without a change here;
`num_inference_steps` and `guidance_scale` are accepted for `steps` and `text_guidance_scale` as diffusers names them.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.convert import DEFAULTS
from serving.frontend.openai_errors import OpenAIError, bad_request, shown
from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS, ChatLimits
from serving.pipeline.request import MAX_SEED, SEED_RANGE

MODEL_ID = "OmniGen2"  # the one model served, as GetModelInfo names it

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
# ASCII digits only: int() and float() also take other scripts' digits ("٦٤"), and float() "1_0" and "inf".
_FORM_INT = re.compile(r"[+-]?[0-9]{1,20}")
_FORM_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,4})?")
_INT32 = pb.GenerateRequest.DESCRIPTOR.fields_by_name["steps"]  # how `n` is typed
_DOUBLE = pb.GenerateRequest.DESCRIPTOR.fields_by_name["text_guidance_scale"]  # how cfg_range's ends are typed


@dataclass
class Names:
    """The request fields the HTTP caller named differently: gRPC name -> HTTP name."""

    renamed: dict[str, str] = field(default_factory=dict)

    def param(self, grpc_field: str) -> str:
        if grpc_field in self.renamed:
            return self.renamed[grpc_field]
        image = re.fullmatch(r"input_images(\[\d+\])?(\.data)?", grpc_field)
        if image:  # the multipart parts are `image`, in order
            return "image" + (image.group(1) or "")
        # An Understand image is the content part's image_url.
        return re.sub(r"\.image(\.data)?$", ".image_url", grpc_field)


@dataclass
class ImageCall:
    request: pb.GenerateRequest
    names: Names
    stream: bool = False
    partial_images: int = 0


@dataclass
class ChatCall:
    request: pb.UnderstandRequest
    names: Names
    stream: bool
    include_usage: bool


def enum_names(enum: EnumDescriptor) -> dict[str, int]:
    """IMAGE_FORMAT_PNG -> "png": a value's name without its enum's prefix, lowercase; UNSPECIFIED is no choice."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    return {
        value.name.removeprefix(prefix).lower(): value.number
        for value in enum.values
        if not value.name.endswith("_UNSPECIFIED")
    }


def _settable(descriptor: Descriptor, excluded: Iterable[str]) -> dict[str, FieldDescriptor]:
    """The fields a caller may set by their gRPC name: scalars, enums and cfg_range (a [start, end] pair)."""
    return {
        f.name: f
        for f in descriptor.fields
        if f.name not in excluded and not f.is_repeated and (f.message_type is None or f.name == "cfg_range")
    }


# GenerateRequest fields the images routes set from OpenAI's own fields (`stream` and `partial_images` set the
# previews), or do not offer (latents: the answer is JSON).
_GENERATE_FIELDS = _settable(
    pb.GenerateRequest.DESCRIPTOR,
    ("prompt", "width", "height", "num_images_per_prompt", "previews", "return_latents", "preview_every"),
)
_GENERATE_ALIASES = {"num_inference_steps": "steps", "guidance_scale": "text_guidance_scale"}
_UNDERSTAND_FIELDS = _settable(pb.UnderstandRequest.DESCRIPTOR, ("messages", "stop"))
_UNDERSTAND_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}
_FORMAT_ALIASES = {"jpg": "jpeg"}


def _value(descriptor: FieldDescriptor, name: str, value: Any, form: bool) -> Any:
    """A JSON (or, with `form`, a multipart text) value as the field's protobuf type; 400 naming `name` if not."""
    kind = descriptor.type
    if kind in _INT_RANGES:
        if form and isinstance(value, str) and _FORM_INT.fullmatch(value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(name, f"must be an integer, got {shown(value)}", "invalid_type")
        if descriptor.name == "seed":  # the service's range, in its words, not int64's
            if not 0 <= value <= MAX_SEED:
                raise bad_request(name, f"{SEED_RANGE}, got {shown(value)}")
            return value
        low, high = _INT_RANGES[kind]
        if not low <= value <= high:
            raise bad_request(name, f"must be in [{low}, {high}], got {shown(value)}")
        return value
    if kind in _FLOATS:
        if form and isinstance(value, str) and _FORM_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request(name, f"must be a number, got {shown(value)}", "invalid_type")
        try:
            number = float(value)
        except OverflowError:  # a JSON integer past float's range
            number = math.inf
        if not math.isfinite(number):
            raise bad_request(name, f"must be a finite number, got {shown(value)}")
        return number
    if kind == FieldDescriptor.TYPE_BOOL:
        if form and isinstance(value, str) and value in ("true", "false"):
            value = value == "true"
        if not isinstance(value, bool):
            raise bad_request(name, f"must be true or false, got {shown(value)}", "invalid_type")
        return value
    if kind == FieldDescriptor.TYPE_ENUM:
        choices = enum_names(descriptor.enum_type)
        if not isinstance(value, str) or _FORMAT_ALIASES.get(value, value) not in choices:
            raise bad_request(name, f"one of {', '.join(choices)}, got {shown(value)}")
        return choices[_FORMAT_ALIASES.get(value, value)]
    if kind == FieldDescriptor.TYPE_STRING:
        return _string(name, value)
    raise AssertionError(f"{descriptor.name}: no conversion for field type {kind}")


def _string(name: str, value: Any) -> str:
    """A string protobuf takes: JSON's \\ud800 escapes make strings that are not UTF-8."""
    if not isinstance(value, str):
        raise bad_request(name, f"must be a string, got {shown(value)}", "invalid_type")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise bad_request(name, "not valid Unicode (a lone surrogate)") from None
    return value


def _set_fields(
    message: Message,
    given: Mapping[str, Any],
    settable: Mapping[str, FieldDescriptor],
    aliases: Mapping[str, str],
    names: Names,
    form: bool,
) -> None:
    """Set each given field (null: the server's default); the caller's name of a field is kept for errors."""
    seen: dict[str, str] = {}  # field -> the name it was given by
    for name, value in given.items():
        target = aliases.get(name, name)
        if value is None:
            continue
        if target in seen:
            raise bad_request(name, f"given together with {seen[target]}")
        seen[target] = name
        if target != name:
            names.renamed[target] = name
        if target == "cfg_range":
            start, end = _pair(name, value, form)
            message.cfg_range.start, message.cfg_range.end = start, end
        else:
            setattr(message, target, _value(settable[target], name, value, form))


def _pair(name: str, value: Any, form: bool) -> tuple[float, float]:
    if form and isinstance(value, list) and len(value) == 1:  # one form field holding "[0, 1]"
        value = value[0]
    if form and isinstance(value, str):
        value = value.strip().strip("[]").split(",")
    if not isinstance(value, list) or len(value) != 2:
        raise bad_request(name, f"must be [start, end], got {shown(value)}", "invalid_type")
    start, end = (_value(_DOUBLE, name, v.strip() if isinstance(v, str) else v, form) for v in value)
    return start, end


def _check_user(value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise bad_request("user", f"must be a string, got {shown(value)}", "invalid_type")


def _check_model(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise bad_request("model", f"must be a string, got {shown(value)}", "invalid_type")
    if value.lower() != MODEL_ID.lower():
        message = f"model: {shown(value)} is not served; GET /v1/models lists {MODEL_ID!r}"
        raise OpenAIError(404, message, param="model", code="model_not_found")


_SIZE = re.compile(r"([0-9]{1,9})x([0-9]{1,9})")
_IMAGE_FIELDS = ("prompt", "model", "n", "size", "response_format", "user", "stream", "partial_images")
_BOOL = pb.GenerateRequest.DESCRIPTOR.fields_by_name["previews"]  # how `stream` is typed
MAX_PARTIAL_IMAGES = 3  # OpenAI's range of partial_images is 0-3


def image_call(body: Mapping[str, Any], images: list[bytes], form: bool = False) -> ImageCall:
    """POST /v1/images/generations (JSON) and /v1/images/edits (multipart, `form`): the Generate request."""
    names = Names()
    request = pb.GenerateRequest(input_images=[pb.Image(data=data) for data in images])
    unknown = [k for k in body if k not in _IMAGE_FIELDS and k not in _GENERATE_FIELDS and k not in _GENERATE_ALIASES]
    if unknown:
        hint = "OmniGen2 takes its settings by their gRPC names (docs/api.md)"
        raise bad_request(unknown[0], f"unknown field; {hint}", "unknown_parameter")
    _check_model(body.get("model"))
    prompt = body.get("prompt")
    if prompt is not None:  # missing or empty: refused by the service
        request.prompt = _value(pb.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"], "prompt", prompt, form)
    _check_user(body.get("user"))
    response_format = body.get("response_format")
    if response_format == "url":
        raise bad_request("response_format", "url is not offered: this server hosts no images; use b64_json")
    if response_format not in (None, "b64_json"):
        raise bad_request("response_format", f"must be b64_json, got {shown(response_format)}")
    if body.get("n") is not None:
        names.renamed["num_images_per_prompt"] = "n"
        request.num_images_per_prompt = _value(_INT32, "n", body["n"], form)
    size = body.get("size")
    if size is not None and size != "auto":
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise bad_request("size", f'must be "WIDTHxHEIGHT" (e.g. "1024x1024") or "auto", got {shown(size)}')
        request.width, request.height = int(match[1]), int(match[2])
    names.renamed |= {"width": "size", "height": "size"}
    settings = {k: v for k, v in body.items() if k not in _IMAGE_FIELDS}
    _set_fields(request, settings, _GENERATE_FIELDS, _GENERATE_ALIASES, names, form)
    stream = body.get("stream") is not None and _value(_BOOL, "stream", body["stream"], form)
    partial_images = 0
    if body.get("partial_images") is not None:
        partial_images = _value(_INT32, "partial_images", body["partial_images"], form)
        if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
            raise bad_request("partial_images", f"must be in [0, {MAX_PARTIAL_IMAGES}], got {partial_images}")
        if partial_images and not stream:
            raise bad_request("partial_images", "partial images are sent only with stream: true")
    if partial_images:
        _ask_previews(request, names, partial_images)
    return ImageCall(request, names, stream, partial_images)


def _ask_previews(request: pb.GenerateRequest, names: Names, partial_images: int) -> None:
    """Previews `partial_images` times before the last step, evenly spaced: every (steps - 1) // partial_images
    steps (the gateway forwards the first `partial_images` before the last step; the last is the final image).
    Previews are of the first image only, so they are refused with more than one."""
    if request.HasField("num_images_per_prompt") and request.num_images_per_prompt > 1:
        raise bad_request("n", "partial_images previews one image: stream n > 1 with partial_images 0")
    steps = request.steps if request.HasField("steps") else DEFAULTS.steps
    names.renamed["preview_every"] = "partial_images"  # set from it; out of range only when steps is too
    request.previews = True
    request.preview_every = max(1, (steps - 1) // partial_images)


_CHAT_FIELDS = ("model", "messages", "stop", "stream", "stream_options", "n", "user")
_ROLES = {"user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "system": pb.ROLE_SYSTEM, "developer": pb.ROLE_SYSTEM}
_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)


def chat_call(body: Mapping[str, Any], limits: ChatLimits = DEFAULT_CHAT_LIMITS) -> ChatCall:
    """POST /v1/chat/completions: the Understand request. The service's counts of messages and parts are checked
    before the messages are converted (a body of 200k messages took 1.3 s of a core to convert, then be refused)."""
    names = Names()
    unknown = [
        k for k in body if k not in _CHAT_FIELDS and k not in _UNDERSTAND_FIELDS and k not in _UNDERSTAND_ALIASES
    ]
    if unknown:
        raise bad_request(unknown[0], "unknown field", "unknown_parameter")
    _check_model(body.get("model"))
    _check_user(body.get("user"))
    # Only null means unset, and for stop also [] and a lone "" (as before 949e9b0: OpenAI's documented schema sets
    # no least length); 0, false, [] and "" elsewhere are values of the wrong type or value, refused.
    if body.get("n") is not None and _value(_INT32, "n", body["n"], form=False) != 1:
        raise bad_request("n", f"only 1 choice is offered, got {shown(body['n'])}")
    stream = body.get("stream") is not None and _value(_BOOL, "stream", body["stream"], form=False)
    options = {} if body.get("stream_options") is None else body["stream_options"]
    if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
        raise bad_request("stream_options", 'takes only {"include_usage": true|false}')
    asked = options.get("include_usage")
    include_usage = asked is not None and _value(_BOOL, "stream_options.include_usage", asked, form=False)
    if body.get("stream_options") is not None and not stream:  # OpenAI refuses it too
        raise bad_request("stream_options", "is only taken with stream: true")
    stop = body.get("stop")
    stops = [] if stop is None or stop == "" else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list):
        raise bad_request("stop", "must be a string or a list of strings", "invalid_type")
    stops = [_string("stop", s) for s in stops]
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("messages", "must be a list of messages", "invalid_type")
    if len(messages) > limits.max_messages:
        raise bad_request("messages", f"at most {limits.max_messages} messages, got {len(messages)}")
    parts = sum(_part_count(m) for m in messages)
    if parts > limits.max_parts:
        raise bad_request("messages", f"at most {limits.max_parts} content parts in all, got {parts}")
    request = pb.UnderstandRequest(messages=[_message(i, m) for i, m in enumerate(messages)], stop=stops)
    settings = {k: v for k, v in body.items() if k not in _CHAT_FIELDS}
    _set_fields(request, settings, _UNDERSTAND_FIELDS, _UNDERSTAND_ALIASES, names, form=False)
    return ChatCall(request, names, stream, include_usage)


def _part_count(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    return len(content) if isinstance(content, list) else int(isinstance(content, str))


def _message(i: int, message: Any) -> pb.ChatMessage:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(where, "must be an object with role and content", "invalid_type")
    extra = set(message) - {"role", "content", "name"}
    if extra:
        raise bad_request(f"{where}.{sorted(extra)[0]}", "unknown field", "unknown_parameter")
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise bad_request(f"{where}.role", f"one of {', '.join(_ROLES)}, got {shown(role)}")
    content = message.get("content")
    if content is None:
        parts = []
    elif isinstance(content, str):
        parts = [pb.ContentPart(text=_string(f"{where}.content", content))]
    elif isinstance(content, list):
        parts = [_part(f"{where}.content[{j}]", part) for j, part in enumerate(content)]
    else:
        raise bad_request(f"{where}.content", "must be a string or a list of parts", "invalid_type")
    return pb.ChatMessage(role=_ROLES[role], content=parts)


def _part(where: str, part: Any) -> pb.ContentPart:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and set(part) == {"type", "text"} and isinstance(part["text"], str):
        return pb.ContentPart(text=_string(f"{where}.text", part["text"]))
    if kind == "image_url" and set(part) == {"type", "image_url"}:
        image = part["image_url"]
        url = image.get("url") if isinstance(image, dict) and set(image) <= {"url", "detail"} else image
        if isinstance(url, str):
            return pb.ContentPart(image=pb.Image(data=_data_url(f"{where}.image_url", url)))
    raise bad_request(
        where,
        'must be {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": "data:..."}}',
        "invalid_type",
    )


def _data_url(where: str, url: str) -> bytes:
    """The bytes of a base64 data URL; the server fetches nothing, so any other URL is refused."""
    header = _DATA_URL.match(url)
    if header is None:
        raise bad_request(
            where,
            "only data URLs are taken (data:image/png;base64,...): the server fetches no remote image",
            "invalid_image_url",
        )
    if "base64" not in header[2].lower().split(";"):
        raise bad_request(where, "a data URL must be base64-encoded (data:image/png;base64,...)", "invalid_image_url")
    try:
        return base64.b64decode(url[header.end() :], validate=True)
    except binascii.Error as exc:
        raise bad_request(where, f"not valid base64: {exc}", "invalid_image_url") from None
