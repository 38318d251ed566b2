"""The task suite: synthetic instruction tasks with programmatic gold judges.

``tribune.trainer.task.registry`` lists them (``TASKS``, ``get_task``, ``task_list_lines``);
``tribune.trainer.task.make`` writes one (``TaskConfig``, ``make_task``). The bundled task, the
default, has its judge in ``tribune.trainer.task.judge``; each other task is one module
(``arithmetic``, ``sequence``, ``keyword``, ``style``) with its judge, demonstrator and spec.
"""
