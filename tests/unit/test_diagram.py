"""The state diagram is drawn from the machine itself, deterministically, and marks a saga."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from transitions import Machine

from saga.diagram import (
    NODE_H,
    NODE_W,
    MachineDefinition,
    Transition,
    definition,
    layout,
    render_svg,
    taken_from_history,
)
from saga.machine import MACHINE, STATES, TRANSITIONS
from saga.model import TERMINAL_STATES as TERMINAL

SVG = "{http://www.w3.org/2000/svg}"


def _expanded_rows() -> set[tuple[str, str, str | None]]:
    rows = set()
    for t in TRANSITIONS:
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        for source in sources:
            rows.add((t["trigger"], source, t["dest"]))
    return rows


def test_the_definition_is_read_off_the_running_machine() -> None:
    defn = definition()
    assert defn.states == tuple(STATES)
    assert defn.terminal == TERMINAL
    assert {(t.trigger, t.source, t.dest) for t in defn.transitions} == _expanded_rows()
    body = defn.as_json()
    assert {"name": "completed", "terminal": True} in body["states"]
    assert {"trigger": "redispatch", "source": "processing_final", "dest": None} \
        in body["transitions"]


def test_a_different_machine_gives_a_different_definition() -> None:
    machine = Machine(model=None, states=["a", "b", "c"], initial=None, auto_transitions=False,
                      transitions=[{"trigger": "go", "source": "a", "dest": "b"},
                                   {"trigger": "stop", "source": "b", "dest": "c"}])
    defn = definition(machine, {"c"})
    assert defn.states == ("a", "b", "c")
    assert [(t.trigger, t.source, t.dest) for t in defn.transitions] == [
        ("go", "a", "b"), ("stop", "b", "c")]


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def test_every_state_is_a_node_and_only_the_current_one_is_marked() -> None:
    root = _parse(render_svg(definition(), current="processing_final"))
    nodes = {g.get("data-state"): g for g in root.iter(f"{SVG}g") if g.get("data-state")}
    assert set(nodes) == set(STATES)
    current = [name for name, g in nodes.items() if g.get("aria-current") == "step"]
    assert current == ["processing_final"]
    assert "terminal" in (nodes["expired"].get("class") or "")
    assert "terminal" not in (nodes["compensating"].get("class") or "")


def test_the_path_taken_is_marked_and_nothing_else() -> None:
    events = [
        {"kind": "transition", "from_state": "requested", "to_state": "processing_samples"},
        {"kind": "credit", "detail": {"op": "reserve"}},
        {"kind": "transition", "from_state": "processing_samples",
         "to_state": "processing_samples"},  # a retry: stays in the stage
        {"kind": "transition", "from_state": "processing_samples", "to_state": "failed"},
    ]
    taken = taken_from_history(events)
    assert taken == [("requested", "processing_samples"),
                     ("processing_samples", "processing_samples"),
                     ("processing_samples", "failed")]
    root = _parse(render_svg(definition(), current="failed", taken=taken))
    marked = {(g.get("data-source"), g.get("data-dest")) for g in root.iter(f"{SVG}g")
              if g.get("data-source") and "taken" in (g.get("class") or "").split()}
    assert marked == set(taken)
    visited = {g.get("data-state") for g in root.iter(f"{SVG}g")
               if g.get("data-state") and "taken" in (g.get("class") or "").split()}
    assert visited == {"requested", "processing_samples", "failed"}


def test_every_transition_is_drawn_once_per_pair_with_all_its_triggers() -> None:
    root = _parse(render_svg(definition()))
    edges = {(g.get("data-source"), g.get("data-dest")): g.get("data-trigger")
             for g in root.iter(f"{SVG}g") if g.get("data-source")}
    for trigger, source, dest in _expanded_rows():
        label = edges[(source, dest if dest is not None else source)]
        assert trigger in (label or "").split(" / ")


def test_the_layout_is_deterministic_and_layered() -> None:
    defn = definition()
    first, second = layout(defn), layout(defn)
    assert first.positions == second.positions
    assert render_svg(defn, current="completed") == render_svg(defn, current="completed")
    x = {state: pos[0] for state, pos in first.positions.items()}
    assert x["requested"] < x["processing_samples"] < x["awaiting_selection"] \
        < x["processing_final"]
    # Outcomes share the last column, to the right of every non-terminal state.
    assert len({x[s] for s in TERMINAL}) == 1
    assert min(x[s] for s in TERMINAL) > max(x[s] for s in STATES if s not in TERMINAL)
    # No two states overlap.
    boxes = sorted(first.positions.values())
    assert len(set(boxes)) == len(boxes)


def test_long_edges_go_around_states_not_through_them() -> None:
    shape = layout(definition())
    columns = sorted({x for x, _ in shape.positions.values()})
    for edge, points in shape.edges:
        x0, x1 = shape.positions[edge.source][0], shape.positions[edge.dest][0]
        spans = abs(columns.index(x1) - columns.index(x0))
        assert len(points) == max(spans, 1) + 1, edge  # a waypoint in every layer crossed
        for wx, wy in points[1:-1]:
            for sx, sy in shape.positions.values():
                inside = abs(wx - sx) <= NODE_W / 2 and abs(wy - sy) <= NODE_H / 2
                assert not inside, (edge, (wx, wy))


def test_names_are_escaped() -> None:
    defn = MachineDefinition(("a<b", 'q"t'), frozenset({'q"t'}),
                             (Transition("go&", "a<b", 'q"t'),))
    svg = render_svg(defn, current="a<b")
    root = _parse(svg)  # well-formed despite the characters
    assert {g.get("data-state") for g in root.iter(f"{SVG}g") if g.get("data-state")} == {
        "a<b", 'q"t'}


def test_the_machine_it_draws_is_the_one_sagas_run_on() -> None:
    assert set(definition().states) == set(MACHINE.states)
