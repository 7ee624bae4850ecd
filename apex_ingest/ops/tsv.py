"""Tab-separated lines for the admin commands' listings (`events tail`, `dead-letters list`...).

Their cells hold what clients sent (a rejected event's type, visitor id, URL), so a tab in one
would shift the columns of the line and an escape sequence would reach the operator's terminal:
control characters are written as `\\xNN`, as the text logs write them.
"""

from __future__ import annotations

from apex_ingest.common.logs import escape_control


def row(*cells: object) -> str:
    """One line: the cells, each with its control characters escaped, joined by tabs."""
    return "\t".join(escape_control(str(cell)) for cell in cells)
