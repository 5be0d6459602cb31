"""The state diagram, read from the machine the service runs and drawn as SVG.

:func:`definition` reads states and transitions off the live ``transitions.Machine`` (never a
copy), and :func:`render_svg` draws them with a small layered ("Sugiyama") layout computed in
pure Python, so the same machine always gives the same picture and nothing outside the package
(graphviz) is needed:

1. edges that close a cycle (found by a depth-first walk from the initial state, in the
   machine's own state order) are turned around, so the graph is acyclic;
2. every state gets the layer of its longest path from the initial state; terminal states all
   share the last layer, so the outcomes read as one column on the right;
3. an edge spanning several layers gets an invisible waypoint in each layer it crosses, so it
   is routed between the states rather than through them;
4. a few barycentre sweeps order each layer to reduce crossings; ties keep the machine's order.

Internal transitions (``dest`` None: the saga stays where it is) are drawn as loops over their
state. When a saga is given, its current state carries ``aria-current="step"`` and the states
and edges its history went through carry the class ``taken``.

Over 300 lines on purpose: the machine's layout and its SVG rendering, one pure module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any
from xml.sax.saxutils import escape, quoteattr

NODE_W = 148
NODE_H = 38
LAYER_GAP = 92  # horizontal space between two layers of nodes
ROW_H = 64  # vertical space per slot in a layer
WAYPOINT_H = 26  # vertical space an edge waypoint takes in a layer
MARGIN = 24
LOOP_H = 30


@dataclass(frozen=True)
class Transition:
    trigger: str
    source: str
    dest: str | None  # None: internal, the state does not change


@dataclass(frozen=True)
class MachineDefinition:
    states: tuple[str, ...]
    terminal: frozenset[str]
    transitions: tuple[Transition, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "states": [{"name": s, "terminal": s in self.terminal} for s in self.states],
            "transitions": [{"trigger": t.trigger, "source": t.source, "dest": t.dest}
                            for t in self.transitions],
        }


def definition(machine: Any = None, terminal: Iterable[str] | None = None) -> MachineDefinition:
    """States and transitions of ``machine`` (default: the one every saga runs on)."""
    if machine is None or terminal is None:
        from saga.machine import MACHINE
        from saga.model import TERMINAL_STATES as TERMINAL

        machine = MACHINE if machine is None else machine
        terminal = TERMINAL if terminal is None else terminal
    states = tuple(str(name) for name in machine.states)
    rows: list[Transition] = []
    for name, event in machine.events.items():
        for source, transitions in event.transitions.items():
            for transition in transitions:
                rows.append(Transition(str(name), str(source),
                                       None if transition.dest is None else str(transition.dest)))
    order = {s: i for i, s in enumerate(states)}
    rows.sort(key=lambda t: (order[t.source], order.get(t.dest or t.source, 0)))
    return MachineDefinition(states, frozenset(terminal), tuple(rows))


# ---------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Edge:
    source: str
    dest: str
    triggers: tuple[str, ...]


@dataclass
class Layout:
    width: int
    height: int
    positions: dict[str, tuple[float, float]]  # state -> node centre
    edges: list[tuple[_Edge, list[tuple[float, float]]]]  # edge -> polyline, source to dest
    loops: dict[str, tuple[str, ...]]  # state -> triggers of its internal transitions


def _merged_edges(defn: MachineDefinition) -> tuple[list[_Edge], dict[str, tuple[str, ...]]]:
    pairs: dict[tuple[str, str], list[str]] = {}
    loops: dict[str, list[str]] = {}
    for t in defn.transitions:
        if t.dest is None or t.dest == t.source:
            names = loops.setdefault(t.source, [])
            if t.trigger not in names:
                names.append(t.trigger)
            continue
        names = pairs.setdefault((t.source, t.dest), [])
        if t.trigger not in names:
            names.append(t.trigger)
    edges = [_Edge(s, d, tuple(n)) for (s, d), n in pairs.items()]
    return edges, {s: tuple(n) for s, n in loops.items()}


def _back_edges(states: Sequence[str], edges: list[_Edge]) -> set[tuple[str, str]]:
    out: dict[str, list[str]] = {s: [] for s in states}
    for e in edges:
        out[e.source].append(e.dest)
    back: set[tuple[str, str]] = set()
    colour: dict[str, int] = {}  # 1: on the stack, 2: done

    def walk(node: str) -> None:
        colour[node] = 1
        for nxt in out[node]:
            if colour.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in colour:
                walk(nxt)
        colour[node] = 2

    for state in states:
        if state not in colour:
            walk(state)
    return back


def layout(defn: MachineDefinition) -> Layout:
    states = list(defn.states)
    edges, loops = _merged_edges(defn)
    back = _back_edges(states, edges)
    # Acyclic orientation: (upper, lower) with upper in an earlier layer.
    forward = [(e.dest, e.source) if (e.source, e.dest) in back else (e.source, e.dest)
               for e in edges]

    layer: dict[str, int] = {s: 0 for s in states}
    for _ in states:  # longest path by relaxation; |states| rounds always suffice on a DAG
        changed = False
        for upper, lower in forward:
            if layer[lower] < layer[upper] + 1:
                layer[lower] = layer[upper] + 1
                changed = True
        if not changed:
            break
    inner = [layer[s] for s in states if s not in defn.terminal]
    last = max([*inner, *[layer[s] for s in defn.terminal]], default=0)
    if defn.terminal and inner:
        last = max(last, max(inner) + 1)
    for s in defn.terminal:
        layer[s] = last

    # Nodes per layer: states, then one waypoint per edge per layer it crosses.
    columns: list[list[str]] = [[] for _ in range(last + 1)]
    for s in states:
        columns[layer[s]].append(s)
    chains: list[list[str]] = []  # per edge: upper, waypoints..., lower
    for i, (upper, lower) in enumerate(forward):
        chain = [upper]
        for depth in range(layer[upper] + 1, layer[lower]):
            waypoint = f"\0{i}:{depth}"
            columns[depth].append(waypoint)
            chain.append(waypoint)
        chain.append(lower)
        chains.append(chain)

    neighbours: dict[str, list[str]] = {}
    for chain in chains:
        for a, b in pairwise(chain):
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)

    def sweep(col: list[str], ref: list[str]) -> list[str]:
        index = {n: i for i, n in enumerate(ref)}
        current = {n: i for i, n in enumerate(col)}

        def key(node: str) -> tuple[float, int]:
            near = [index[m] for m in neighbours.get(node, []) if m in index]
            return (sum(near) / len(near) if near else float(current[node]), current[node])
        return sorted(col, key=key)

    for _ in range(4):
        for d in range(1, len(columns)):
            columns[d] = sweep(columns[d], columns[d - 1])
        for d in range(len(columns) - 2, -1, -1):
            columns[d] = sweep(columns[d], columns[d + 1])

    def slot(node: str) -> float:
        if node.startswith("\0"):
            return WAYPOINT_H
        return ROW_H + (LOOP_H if node in loops else 0)

    heights = [sum(slot(n) for n in col) for col in columns]
    tallest = max(heights, default=ROW_H)
    positions: dict[str, tuple[float, float]] = {}
    for d, col in enumerate(columns):
        x = MARGIN + d * (NODE_W + LAYER_GAP) + NODE_W / 2
        y = MARGIN + (tallest - heights[d]) / 2
        for node in col:
            extra = LOOP_H if node in loops else 0
            positions[node] = (x, y + extra + (slot(node) - extra) / 2)
            y += slot(node)

    drawn: list[tuple[_Edge, list[tuple[float, float]]]] = []
    for edge, chain in zip(edges, chains, strict=True):
        points = [positions[n] for n in chain]
        if (edge.source, edge.dest) in back:
            points.reverse()
        drawn.append((edge, points))
    width = int(2 * MARGIN + len(columns) * NODE_W + (len(columns) - 1) * LAYER_GAP)
    # Room below the lowest node for the curves of edges going back, not the slots' padding.
    height = int(max(y for _x, y in positions.values()) + NODE_H / 2 + 44 + MARGIN)
    return Layout(width, height, {s: positions[s] for s in states}, drawn, loops)


# ---------------------------------------------------------------------------------- drawing
def _path(points: list[tuple[float, float]]) -> str:
    """A smooth curve leaving the source's side and entering the destination's side; an edge
    going back (right to left) leaves and enters underneath, so it never covers the edge
    going forward between the same states."""
    (x0, y0), (x1, y1) = points[0], points[-1]
    if x1 < x0:
        start, end = (x0, y0 + NODE_H / 2), (x1 + 12, y1 + NODE_H / 2)
        if len(points) == 2:
            sag = max(y0, y1) + NODE_H / 2 + 34
            return (f"M{start[0]:.1f},{start[1]:.1f} C{x0:.1f},{sag:.1f} "
                    f"{x1 + 12:.1f},{sag:.1f} {end[0]:.1f},{end[1]:.1f}")
        return _smooth([start, *points[1:-1], end])
    going_right = x1 >= x0
    half = NODE_W / 2
    start = (x0 + half if going_right else x0 - half, y0)
    end = (x1 - half if going_right else x1 + half, y1)
    if x1 == x0:  # same layer: bow out to the right
        start, end = (x0 + half, y0), (x1 + half, y1)
        bow = x0 + half + 40
        return (f"M{start[0]:.1f},{start[1]:.1f} C{bow:.1f},{start[1]:.1f} "
                f"{bow:.1f},{end[1]:.1f} {end[0]:.1f},{end[1]:.1f}")
    return _smooth([start, *points[1:-1], end])


def _smooth(through: list[tuple[float, float]]) -> str:
    """Cubic segments with horizontal tangents at every point: a curve through waypoints."""
    out = f"M{through[0][0]:.1f},{through[0][1]:.1f}"
    for (ax, ay), (bx, by) in pairwise(through):
        mid = (ax + bx) / 2
        out += f" C{mid:.1f},{ay:.1f} {mid:.1f},{by:.1f} {bx:.1f},{by:.1f}"
    return out


def _label_point(points: list[tuple[float, float]]) -> tuple[float, float]:
    (x0, y0), (x1, y1) = points[0], points[-1]
    if len(points) > 2:
        mid = points[len(points) // 2]
        return mid[0], mid[1] - 4
    if x1 == x0:
        return x0 + NODE_W / 2 + 44, (y0 + y1) / 2
    if x1 < x0:
        return (x0 + x1) / 2 + 6, max(y0, y1) + NODE_H / 2 + 30
    return (x0 + x1) / 2, (y0 + y1) / 2 - 5


def render_svg(defn: MachineDefinition, *, current: str | None = None,
               taken: Iterable[tuple[str, str]] = (),
               title: str = "Generation state machine") -> str:
    """The machine as an SVG document; ``taken`` are (source, dest) pairs the saga went
    through (internal transitions as (state, state))."""
    shape = layout(defn)
    went = set(taken)
    visited = {s for pair in went for s in pair}
    if current is not None:
        visited.add(current)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="state-diagram" role="img" '
        f'viewBox="0 0 {shape.width} {shape.height}" width="{shape.width}" '
        f'height="{shape.height}" aria-labelledby="diagram-title">',
        f'<title id="diagram-title">{escape(title)}</title>',
        "<style>"
        ".state-diagram{font-family:system-ui,-apple-system,'Segoe UI',sans-serif}"
        ".state rect{fill:#fff;stroke:#8a94a6;stroke-width:1.5}"
        ".state.terminal rect{fill:#f3f4f6;stroke-dasharray:4 2}"
        ".state text{font-size:13px;fill:#1f2937;text-anchor:middle;dominant-baseline:central}"
        ".state.taken rect{fill:#e0ecff;stroke:#2f6fde}"
        ".state[aria-current=step] rect{fill:#2f6fde;stroke:#173f8a;stroke-width:3}"
        ".state[aria-current=step] text{fill:#fff;font-weight:700}"
        ".edge path{fill:none;stroke:#b6bdc9;stroke-width:1.3}"
        ".edge text{font-size:10.5px;fill:#6b7280;text-anchor:middle;paint-order:stroke;"
        "stroke:#fff;stroke-width:3px;stroke-linejoin:round}"
        ".edge.taken path{stroke:#2f6fde;stroke-width:2.6}"
        ".edge.taken text{fill:#173f8a;font-weight:700}"
        "</style>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" '
        'markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse">'
        '<path d="M0,0L10,5L0,10z" '
        'fill="#8a94a6"/></marker>'
        '<marker id="arrow-taken" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" '
        'markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse">'
        '<path d="M0,0L10,5L0,10z" '
        'fill="#2f6fde"/></marker></defs>',
    ]
    for edge, points in shape.edges:
        on_path = (edge.source, edge.dest) in went
        label = " / ".join(edge.triggers)
        lx, ly = _label_point(points)
        parts.append(
            f'<g class="edge{" taken" if on_path else ""}" data-source={quoteattr(edge.source)}'
            f' data-dest={quoteattr(edge.dest)} data-trigger={quoteattr(label)}>'
            f"<title>{escape(edge.source)} → {escape(edge.dest)}: {escape(label)}</title>"
            f'<path d="{_path(points)}" marker-end="url(#{"arrow-taken" if on_path else "arrow"})"'
            f"/><text x=\"{lx:.1f}\" y=\"{ly:.1f}\">{escape(label)}</text></g>")
    for state in defn.states:
        x, y = shape.positions[state]
        classes = ["state"]
        if state in defn.terminal:
            classes.append("terminal")
        if state in visited:
            classes.append("taken")
        attrs = ' aria-current="step"' if state == current else ""
        loop = ""
        if state in shape.loops:
            on_path = (state, state) in went
            label = " / ".join(shape.loops[state])
            top = y - NODE_H / 2
            loop = (f'<g class="edge loop{" taken" if on_path else ""}" '
                    f"data-source={quoteattr(state)} data-dest={quoteattr(state)} "
                    f"data-trigger={quoteattr(label)}><title>{escape(state)} (stays): "
                    f'{escape(label)}</title><path d="M{x - 24:.1f},{top:.1f} '
                    f"C{x - 24:.1f},{top - LOOP_H:.1f} {x + 24:.1f},{top - LOOP_H:.1f} "
                    f'{x + 24:.1f},{top:.1f}" marker-end="url(#'
                    f'{"arrow-taken" if on_path else "arrow"})"/>'
                    f'<text x="{x:.1f}" y="{top - LOOP_H + 2:.1f}">{escape(label)}</text></g>')
        parts.append(
            f'{loop}<g class="{" ".join(classes)}" data-state={quoteattr(state)}{attrs}>'
            f"<title>{escape(state)}{' (current)' if state == current else ''}</title>"
            f'<rect x="{x - NODE_W / 2:.1f}" y="{y - NODE_H / 2:.1f}" width="{NODE_W}" '
            f'height="{NODE_H}" rx="8"/><text x="{x:.1f}" y="{y:.1f}">'
            f"{escape(state.replace('_', ' '))}</text></g>")
    parts.append("</svg>")
    return "".join(parts)


def taken_from_history(events: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (from, to) pairs of a saga's history transitions, in order."""
    pairs: list[tuple[str, str]] = []
    for event in events:
        if event.get("kind") != "transition":
            continue
        source, dest = event.get("from_state"), event.get("to_state")
        if isinstance(source, str) and isinstance(dest, str):
            pairs.append((source, dest))
    return pairs
