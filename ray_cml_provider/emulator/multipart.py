"""The one multipart/form-data reader the files API needs (the standard library's ``cgi``
is gone): one field per uploaded file, named by its destination path."""

from __future__ import annotations

from email.message import Message

from ray_cml_provider.emulator.errors import invalid


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(field name, bytes) of each part of a multipart/form-data body."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise invalid("upload must be multipart/form-data")
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        disposition = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition["Content-Disposition"] = value.strip()
        field = disposition.get_param("name", header="content-disposition")
        if isinstance(field, str) and field:
            parts.append((field, data))
    return parts
