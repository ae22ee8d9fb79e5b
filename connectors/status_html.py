"""The status page's HTML (issue 17): one self-contained document, rendered on the server.

Sole purpose: turn a ``Snapshot`` into HTML that works without JavaScript (it has none: a
``<meta http-equiv="refresh">`` reloads it, and a link stops that, WCAG 2.2.1), loads
nothing from anywhere (one inline style sheet, allowed by its nonce), and reads well to a
screen reader (``lang``, headings, table captions, ``th`` with ``scope``, state in words as
well as colour, contrast of 7:1 or more).

Invariants: every value that did not come from this module goes through ``_esc`` (cut to
``MAX_TEXT`` characters, then ``html.escape``d): a team id, a component's reason, a channel
or reason name alike. Every list is cut to a fixed number of rows, so the page has a bound
whatever the input (about 200 KB).
"""

import html
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from ingest.recent import RecentDecisions

#: characters of one value shown; longer ones end in "…"
MAX_TEXT = 120
#: rows of one table at most (the decisions are 50 by construction)
MAX_ROWS = 100
DEAD_QUEUE = "omniroute.dead"


@dataclass(frozen=True)
class Redaction:
    """How identities and free text are shown: ``config`` hands in the logging rules and
    ``log.redact`` as it is now (a reload may change it)."""

    redact: Callable[[str], str]  # one identity, redacted
    scrub: Callable[[str], str]  # free text, identities and secrets in it redacted
    hide_secrets: Callable[[str], str]  # free text, secrets alone hidden
    enabled: Callable[[], bool]  # log.redact

    @property
    def redacting(self) -> bool:
        return self.enabled()

    def identity(self, value: str) -> str:
        return self.redact(value) if self.enabled() else value

    def text(self, value: str) -> str:
        return self.scrub(value) if self.enabled() else self.hide_secrets(value)


@dataclass(frozen=True)
class QueueReport:
    at: float | None  # when the depths were asked; None: never answered
    depths: tuple[tuple[str, int, int], ...]  # (queue, messages ready, consumers)
    problem: str | None  # why the last question failed, or None


@dataclass(frozen=True)
class Snapshot:
    at: float
    ready: bool
    problems: list[str]
    components: Mapping[str, Mapping[str, str | bool]]
    recent: RecentDecisions | None
    queues: QueueReport
    dead_by: str  # "reason" or "queue"
    dead: list[tuple[str, int]]


def _esc(value: object, limit: int = MAX_TEXT) -> str:
    text = str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text, quote=True)


def _time(at: float, *, seconds: bool = True) -> str:
    moment = datetime.fromtimestamp(at, UTC)
    shown = moment.strftime("%H:%M:%S" if seconds else "%H:%M")
    return f'<time datetime="{moment.isoformat(timespec="seconds")}">{shown}</time>'


def _rows(rows: Iterable[str], columns: int, empty: str) -> str:
    taken = list(rows)
    if not taken:
        return f'<tr><td colspan="{columns}">{_esc(empty)}</td></tr>'
    return "\n".join(taken[:MAX_ROWS])


STYLE = """
:root { color-scheme: light; }
body { font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #1b1b1b; background: #ffffff; margin: 0 auto; padding: 1rem 1.5rem 3rem;
  max-width: 72rem; }
h1 { font-size: 1.6rem; margin: .5rem 0; }
h2 { font-size: 1.25rem; margin: 2rem 0 .5rem; border-bottom: 2px solid #d0d0d0; }
a { color: #0645ad; }
a:focus-visible { outline: 3px solid #1b1b1b; outline-offset: 2px; }
nav ul { list-style: none; padding: 0; margin: .5rem 0; display: flex; flex-wrap: wrap;
  gap: 1rem; }
table { border-collapse: collapse; margin: .25rem 0 1rem; min-width: 50%; }
caption { text-align: left; font-weight: 600; padding: .25rem 0; }
th, td { border: 1px solid #c4c4c4; padding: .3rem .6rem; text-align: left;
  vertical-align: top; }
thead th { background: #ececec; }
tfoot th, tfoot td { background: #f5f5f5; font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font: .92em ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
.state { display: inline-block; padding: 0 .5rem; border-radius: .25rem; font-weight: 600; }
.up { background: #e3f3e8; color: #0a4d24; }
.down { background: #fde8e8; color: #8a1616; }
.starting, .standby { background: #fff4d6; color: #5c4300; }
.stopped { background: #ececec; color: #333333; }
.verdict { font-weight: 700; }
.note { color: #3d3d3d; }
"""


def render(snapshot: Snapshot, redaction: Redaction, *, nonce: str, refresh: int | None) -> str:
    """The whole page; ``refresh`` seconds between reloads, or None for none."""
    head_refresh = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    if refresh:
        reloading = (
            f"This page reloads every {int(refresh)} s. "
            '<a href="/status?refresh=0">Stop reloading</a>'
        )
    else:
        reloading = 'Reloading is off. <a href="/status">Reload every 15 s</a>'
    verdict = "Ready" if snapshot.ready else "Not ready"
    problems = "".join(f"<li>{_esc(redaction.text(p))}</li>" for p in snapshot.problems[:20])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{head_refresh}
<title>omniroute status: {verdict}</title>
<style nonce="{_esc(nonce)}">{STYLE}</style>
</head>
<body>
<header>
<h1>omniroute status</h1>
<p><span class="verdict">{verdict}</span> as of {_time(snapshot.at)} UTC. {reloading}</p>
{f'<ul aria-label="Problems">{problems}</ul>' if problems else ""}
<nav aria-label="Sections"><ul>
<li><a href="#components">Components</a></li>
<li><a href="#traffic">Decisions per minute</a></li>
<li><a href="#queues">Queues</a></li>
<li><a href="#decisions">Last decisions</a></li>
<li><a href="#dead">Dead letters</a></li>
</ul></nav>
</header>
<main>
{_components(snapshot, redaction)}
{_traffic(snapshot.recent)}
{_queues(snapshot.queues)}
{_decisions(snapshot.recent, redaction)}
{_dead(snapshot)}
</main>
</body>
</html>
"""


def _components(snapshot: Snapshot, redaction: Redaction) -> str:
    rows = []
    for name, c in snapshot.components.items():
        state = str(c["state"])
        css = state if state in {"up", "down", "starting", "standby", "stopped"} else "stopped"
        rows.append(
            f'<tr><th scope="row">{_esc(name)}</th>'
            f'<td><span class="state {css}">{_esc(state)}</span></td>'
            f"<td>{'yes' if c['required'] else 'no'}</td>"
            f"<td>{_esc(redaction.text(str(c['reason'])), 300)}</td></tr>"
        )
    return f"""<section aria-labelledby="components">
<h2 id="components">Components</h2>
<table>
<caption>Components of this process and their state</caption>
<thead><tr><th scope="col">Component</th><th scope="col">State</th>
<th scope="col">Needed for ready</th><th scope="col">Reason</th></tr></thead>
<tbody>
{_rows(rows, 4, "No components registered yet.")}
</tbody>
</table>
</section>"""


def _traffic(recent: RecentDecisions | None) -> str:
    title = '<section aria-labelledby="traffic">\n<h2 id="traffic">Decisions per minute</h2>'
    if recent is None:
        return (
            f'{title}\n<p class="note">This process does not run the router; the status page '
            "of the instance that does shows its decisions.</p>\n</section>"
        )
    minutes = recent.per_minute()
    keys: Counter[tuple[str, str]] = Counter()
    for minute in minutes:
        keys.update(minute.counts)
    heads = "".join(
        f'<th scope="col" class="n">{_time(m.start, seconds=False)}'
        + (" (so far)" if i == len(minutes) - 1 else "")
        + "</th>"
        for i, m in enumerate(minutes)
    )
    rows = [
        f'<tr><th scope="row">{_esc(channel)}</th><th scope="row">{_esc(reason)}</th>'
        + "".join(f'<td class="n">{m.counts.get((channel, reason), 0)}</td>' for m in minutes)
        + f'<td class="n">{keys[(channel, reason)]}</td></tr>'
        for channel, reason in sorted(keys)
    ]
    totals = "".join(f'<td class="n">{sum(m.counts.values())}</td>' for m in minutes)
    columns = len(minutes) + 3
    return f"""{title}
<table>
<caption>Routing decisions of this process per minute (UTC), by channel and reason, over
the last {len(minutes)} minutes</caption>
<thead><tr><th scope="col">Channel</th><th scope="col">Reason</th>{heads}
<th scope="col" class="n">Total</th></tr></thead>
<tbody>
{_rows(rows, columns, f"No decisions in the last {len(minutes)} minutes.")}
</tbody>
<tfoot><tr><th scope="row" colspan="2">All</th>{totals}
<td class="n">{sum(keys.values())}</td></tr></tfoot>
</table>
</section>"""


def _queues(report: QueueReport) -> str:
    rows = [
        f'<tr><th scope="row"><code>{_esc(name)}</code></th><td class="n">{ready}</td>'
        f'<td class="n">{consumers}</td></tr>'
        for name, ready, consumers in report.depths
    ]
    asked = f"as of {_time(report.at)} UTC" if report.at is not None else "not known"
    problem = (
        f'<p class="note">The broker did not answer: {_esc(report.problem, 300)}</p>'
        if report.problem
        else ""
    )
    return f"""<section aria-labelledby="queues">
<h2 id="queues">Queues</h2>
{problem}
<table>
<caption>omniroute's queues on the broker, {asked}</caption>
<thead><tr><th scope="col">Queue</th><th scope="col" class="n">Messages ready</th>
<th scope="col" class="n">Consumers</th></tr></thead>
<tbody>
{_rows(rows, 3, "No depths known yet.")}
</tbody>
</table>
</section>"""


def _decisions(recent: RecentDecisions | None, redaction: Redaction) -> str:
    title = '<section aria-labelledby="decisions">\n<h2 id="decisions">Last decisions</h2>'
    if recent is None:
        return f'{title}\n<p class="note">This process does not run the router.</p>\n</section>'
    last = recent.last()
    rows = [
        f"<tr><td>{_time(d.at)}</td><td>{_esc(d.channel)}</td>"
        f"<td><code>{_esc(redaction.identity(d.sender))}</code></td>"
        f"<td><code>{_esc(d.routing_key, 210)}</code></td><td>{_esc(d.reason)}</td>"
        f'<td class="n">{int(d.attempt)}</td></tr>'
        for d in last
    ]
    senders = (
        "senders redacted" if redaction.redacting else "senders shown in full (log.redact = false)"
    )
    return f"""{title}
<table>
<caption>The last {len(last)} decisions of this process, newest first; {senders}</caption>
<thead><tr><th scope="col">Time (UTC)</th><th scope="col">Channel</th>
<th scope="col">Sender</th><th scope="col">Routed to</th><th scope="col">Reason</th>
<th scope="col" class="n">Attempt</th></tr></thead>
<tbody>
{_rows(rows, 6, "No decisions since this process started.")}
</tbody>
</table>
</section>"""


def _dead(snapshot: Snapshot) -> str:
    held = next((ready for name, ready, _ in snapshot.queues.depths if name == DEAD_QUEUE), None)
    holds = (
        f"<p><code>{DEAD_QUEUE}</code> holds {held} message{'' if held == 1 else 's'} now "
        "(<code>omniroute dead list</code> shows them).</p>"
        if held is not None
        else f"<p><code>{DEAD_QUEUE}</code>: depth not known.</p>"
    )
    rows = [
        f'<tr><th scope="row">{_esc(key)}</th><td class="n">{count}</td></tr>'
        for key, count in snapshot.dead
    ]
    by = _esc(snapshot.dead_by)
    return f"""<section aria-labelledby="dead">
<h2 id="dead">Dead letters</h2>
{holds}
<table>
<caption>Messages this process sent to {DEAD_QUEUE} since it started, by {by}</caption>
<thead><tr><th scope="col">{by.capitalize()}</th><th scope="col" class="n">Messages</th>
</tr></thead>
<tbody>
{_rows(rows, 2, "None since this process started.")}
</tbody>
</table>
</section>"""
