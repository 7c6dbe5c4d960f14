"""Every list endpoint answers a `Page`: its items in id order, and the cursor of the next page."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Query
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from server.schemas import INT_MAX, Page

Row = TypeVar("Row")
Item = TypeVar("Item")

Cursor = Annotated[int, Query(ge=0, le=INT_MAX, description="the `next_cursor` of the page before; 0 for the first")]


def page(session: Session, query: Select[tuple[Row]], id_column: InstrumentedAttribute[int], cursor: int, limit: int,
         out: Callable[[Row], Item], newest_first: bool = False) -> Page[Item]:
    """One page of `query`'s rows after `cursor` (before it, newest first), as `out` describes them."""
    if newest_first:
        query = query.where(id_column < cursor) if cursor else query
        query = query.order_by(id_column.desc())
    else:
        query = query.where(id_column > cursor).order_by(id_column)
    rows: Sequence[Any] = session.scalars(query.limit(limit)).all()
    return Page(items=[out(row) for row in rows], next_cursor=rows[-1].id if len(rows) == limit else None)
