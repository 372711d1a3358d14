"""The daemon's control commands: one handler per command schema in worker.protocol, and
each handler takes exactly the arguments its schema names."""
from __future__ import annotations

import inspect

from worker import protocol
from worker.daemon import COMMANDS


def test_every_schemad_control_command_has_exactly_one_handler_and_every_handler_a_schema():
    assert sorted(COMMANDS) == sorted(protocol.CONTROL_COMMANDS)


def test_each_handler_takes_the_arguments_its_schema_names():
    for name, handler in COMMANDS.items():
        params = [p for p in inspect.signature(handler).parameters if p != "self"]
        assert sorted(params) == sorted(protocol.CONTROL_COMMANDS[name]), name
