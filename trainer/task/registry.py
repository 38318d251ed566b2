"""The task suite: every synthetic task by name, and the lines of `tribune task list`.

The suite's own tasks come first; tasks of one's own plug in without editing Tribune, each a
``TaskSpec`` named as ``module:ATTRIBUTE``:

* installed packages declare them as entry points of the group ``tribune.tasks``
  (``[project.entry-points."tribune.tasks"] mytask = "mypkg.tasks:SPEC"``);
* ``$TRIBUNE_TASKS`` names more, comma-separated, from any importable module
  (``TRIBUNE_TASKS=mytasks:SPEC``). Worker processes inherit it, so `tribune evaluate` finds
  them in its jobs as well.

A plugged task is then a task like the suite's: `tribune task list` lists it, `tribune task
make --task NAME` writes it, `tribune evaluate --tasks NAME` runs the pipeline on it, with its
own judge, demonstrator, raters and base model.
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Iterable

from tribune.services.common.errors import UserError
from tribune.trainer.task import arithmetic, bundled, keyword, sequence, style
from tribune.trainer.task.spec import TaskSpec

DEFAULT_TASK = "bundled"
SUITE: tuple[TaskSpec, ...] = (bundled.SPEC, arithmetic.SPEC, sequence.SPEC, keyword.SPEC, style.SPEC)
PLUGIN_GROUP = "tribune.tasks"
PLUGIN_ENV = "TRIBUNE_TASKS"


class UnknownTaskError(ValueError):
    """A task name that is not in the suite."""


class TaskPluginError(UserError):
    """A plugged task that cannot be loaded, or whose name or id another task has."""


def plugin_refs(env: str | None = None) -> list[tuple[str, str]]:
    """(where it was named, "module:ATTRIBUTE") of every plugged task: the entry points of the group
    ``tribune.tasks``, then ``$TRIBUNE_TASKS`` (``env`` in its place when given)."""
    refs = [(f"entry point {ep.name!r} of {PLUGIN_GROUP}", ep.value) for ep in entry_points(group=PLUGIN_GROUP)]
    env = os.environ.get(PLUGIN_ENV, "") if env is None else env
    return refs + [(f"${PLUGIN_ENV}", ref.strip()) for ref in env.split(",") if ref.strip()]


def load_plugged_task(where: str, ref: str) -> TaskSpec:
    """The ``TaskSpec`` that ``ref`` ("module:ATTRIBUTE") names; ``TaskPluginError`` saying what is wrong."""
    module, _, attribute = ref.partition(":")
    if not module or not attribute:
        raise TaskPluginError(f"task plug-in {ref!r} ({where}): expected module:ATTRIBUTE")
    try:
        spec = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise TaskPluginError(f"task plug-in {ref!r} ({where}): {e}") from e
    if not isinstance(spec, TaskSpec):
        raise TaskPluginError(f"task plug-in {ref!r} ({where}): a {type(spec).__name__}, not a "
                              f"tribune.trainer.task.spec.TaskSpec")
    return spec


def build_registry(specs: Iterable[TaskSpec]) -> dict[str, TaskSpec]:
    """The tasks by name, in order; the same spec named twice counts once, while two tasks with one
    name or one task.json id are an error."""
    tasks: dict[str, TaskSpec] = {}
    for spec in specs:
        if any(spec is other for other in tasks.values()):
            continue
        clash = tasks.get(spec.name) or next((t for t in tasks.values() if t.task_id == spec.task_id), None)
        if clash is not None:
            raise TaskPluginError(f"task {spec.name!r} ({spec.task_id}): another task has that name or id: "
                                  f"{clash.name!r} ({clash.task_id})")
        tasks[spec.name] = spec
    return tasks


TASKS: dict[str, TaskSpec] = build_registry([*SUITE, *(load_plugged_task(*r) for r in plugin_refs())])

# task.json records the versioned id ("tribune-bundled-v1"); it names the task as well
_BY_ID: dict[str, TaskSpec] = {spec.task_id: spec for spec in TASKS.values()}


def get_task(name: str) -> TaskSpec:
    """The task called ``name`` (its short name or its task.json id)."""
    spec = TASKS.get(name) or _BY_ID.get(name)
    if spec is None:
        raise UnknownTaskError(f"unknown task {name!r}; the tasks are: {', '.join(TASKS)} (a task of one's own "
                               f"plugs in through ${PLUGIN_ENV} or a {PLUGIN_GROUP} entry point)")
    return spec


def list_tasks() -> list[str]:
    """One line per task, its name first: ``NAME  description``."""
    width = max(len(n) for n in TASKS)
    return [f"{name:<{width}}  {spec.description}" for name, spec in TASKS.items()]


def task_list_lines() -> list[str]:
    """What `tribune task list` prints, one task per line, its name first."""
    return list_tasks()


def task_for_prompts(prompts) -> TaskSpec | None:
    """The one task whose judge accepts every prompt; None when there is none.

    Task prompts are disjoint, so a set of prompts names at most one task; a stage that
    reports a gold score can use this to find the judge of a data set it was given.
    """
    prompts = list(prompts)
    if not prompts:
        return None
    for spec in TASKS.values():
        if all(spec.accepts(p) for p in prompts):
            return spec
    return None
