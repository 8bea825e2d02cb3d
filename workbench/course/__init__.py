"""The workshop course: a 90-minute off-policy RL course that runs on every laptop in the room.

``knob_reference`` is the table of every knob a participant turns (live knobs, objective parameters,
advantage options, correction presets), generated from the registries: ``docs/knobs.md`` and the
in-notebook ``knob_reference(filter)``. ``setup`` prepares and checks a machine for the course
(``python -m workbench course prepare | check | export-cache DIR | import-cache DIR``).
"""
