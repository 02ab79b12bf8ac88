"""Request-size attribution: a request over --max-request-bytes is refused naming the field that holds most of its
bytes, sized without copying the request (docs/reliability.md)."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from serving.frontend.status import invalid_argument

MAX_ELEMENTS_TO_SIZE = 64  # a repeated field with more is named as a whole


def check_request_size(request: Message, max_bytes: int) -> None:
    """A request over the size limit gets INVALID_ARGUMENT naming its largest field (the transport itself refuses
    messages over twice the limit, with RESOURCE_EXHAUSTED, before reading them)."""
    size = request.ByteSize()
    if size > max_bytes:
        field, largest = _largest_field(request, "", size)
        message = f"the request is {size} bytes, the limit is {max_bytes}; its largest field holds {largest}"
        raise invalid_argument([(field or "request", message)])


def _largest_field(message: Message, path: str, size: int) -> tuple[str, int]:
    """The field that holds most of the bytes, descending while one element of it holds most of them. A message
    of `size` bytes with no known field set (unknown fields only: a newer client's, or padding) is named itself."""
    sizes = _field_sizes(message)
    if not sizes:
        return path, size
    name = max(sizes, key=sizes.__getitem__)
    descriptor = message.DESCRIPTOR.fields_by_name[name]
    path, value, size = f"{path}.{name}" if path else name, None, sizes[name]
    if descriptor.is_repeated:
        values: Any = getattr(message, name)
        if len(values) > MAX_ELEMENTS_TO_SIZE:  # spread over many elements: the field itself is the culprit
            return path, size
        # One element holds the field's bytes: not sized again (upb's ByteSize serializes, 0.12 s for 100 MiB).
        elements = [_wire_size(item) for item in values] if len(values) > 1 else [size]
        index = max(range(len(elements)), key=elements.__getitem__)
        if 2 * elements[index] < size:
            return path, size
        path, value = f"{path}[{index}]", values[index]
    elif descriptor.message_type is not None:
        value = getattr(message, name)
    if isinstance(value, Message) and size:
        return _largest_field(value, path, size)
    return path, size


def _field_sizes(message: Message) -> dict[str, int]:
    """The bytes of each field that is set, from C and without copying the message: a copy cleared field by field,
    and the copies of the nested image and its bytes, peaked at 4x a 100 MiB request. A repeated field of more than
    MAX_ELEMENTS_TO_SIZE elements is not walked (a million empty images took 6 s so): it holds what the message holds
    beyond its other fields (split by element count in the unlikely case of several)."""
    sizes: dict[str, int] = {}
    many: dict[str, int] = {}
    for descriptor in message.DESCRIPTOR.fields:
        name = descriptor.name
        if descriptor.is_repeated:
            count = len(getattr(message, name))
            if count > MAX_ELEMENTS_TO_SIZE:
                many[name] = count
            elif count:
                sizes[name] = sum(_wire_size(item) for item in getattr(message, name))
        elif not descriptor.has_presence or message.HasField(name):
            value = getattr(message, name)  # read once: a bytes field's value is a copy
            if descriptor.has_presence or value:
                sizes[name] = _wire_size(value)
    if many:  # upb's ByteSize serializes: only when needed
        rest = max(0, message.ByteSize() - sum(sizes.values()))
        for name, count in many.items():
            sizes[name] = rest * count // sum(many.values())
    return sizes


def _wire_size(item: object) -> int:
    if isinstance(item, Message):
        return int(item.ByteSize())
    if isinstance(item, str):  # its UTF-8 bytes, as on the wire; an ASCII string's without a copy
        return len(item) if item.isascii() else len(item.encode())
    return len(item) if isinstance(item, bytes) else 8
