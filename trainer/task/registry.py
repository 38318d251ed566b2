"""The task suite: every synthetic task by name, and the lines of `tribune task list`."""
from __future__ import annotations

from tribune.trainer.task import arithmetic, bundled, keyword, sequence, style
from tribune.trainer.task.spec import TaskSpec

DEFAULT_TASK = "bundled"

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    bundled.SPEC, arithmetic.SPEC, sequence.SPEC, keyword.SPEC, style.SPEC)}

# task.json records the versioned id ("tribune-bundled-v1"); it names the task as well
_BY_ID: dict[str, TaskSpec] = {spec.task_id: spec for spec in TASKS.values()}


class UnknownTaskError(ValueError):
    """A task name that is not in the suite."""


def get_task(name: str) -> TaskSpec:
    """The task called ``name`` (its short name or its task.json id)."""
    spec = TASKS.get(name) or _BY_ID.get(name)
    if spec is None:
        raise UnknownTaskError(f"unknown task {name!r}; the suite has: {', '.join(TASKS)}")
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
