"""Listing as CML does it: search_filter matching, sorting and paging over CML-shaped
application dicts. Pure functions over values that ``validation`` has already checked."""

from __future__ import annotations

from typing import Any

from ray_cml_provider.emulator.validation import page_token_for


def matches(app: dict[str, Any], search_filter: dict[str, Any]) -> bool:
    """CML's search_filter: case-insensitive SUBSTRING match; status takes lower case."""
    for key, wanted in search_filter.items():
        if key.startswith("creator."):
            actual = app.get("creator", {}).get(key.split(".", 1)[1], "")
        elif key == "status":
            actual = str(app["status"]).removeprefix("APPLICATION_").lower()
            if str(wanted) not in actual:
                return False
            continue
        else:
            actual = app.get(key, "")
        if isinstance(wanted, bool) or isinstance(actual, bool):
            if str(wanted).lower() != str(actual).lower():
                return False
        elif str(wanted).lower() not in str(actual).lower():
            return False
    return True


def page_of(
    apps: list[dict[str, Any]],
    search_filter: dict[str, Any],
    sort: list[tuple[str, bool]],
    page_size: int,
    offset: int,
) -> dict[str, Any]:
    """One page of ``apps`` (in creation order unless sorted) as CML answers a list call."""
    selected = [a for a in apps if matches(a, search_filter)]
    for name, descending in reversed(sort):  # stable sorts: least significant first
        selected.sort(key=lambda a, n=name: str(a.get(n, "")), reverse=descending)
    page = selected[offset : offset + page_size]
    more = offset + page_size < len(selected)
    return {
        "applications": page,
        "next_page_token": page_token_for(offset + page_size) if more else "",
    }
