"""The phases of a search, in the order the controller runs them. Each is one class
with one method, ``run(controller)``: it asks the controller's loop for trials
(:meth:`~mergesearch.search.controller.Controller.loop`) or runs jobs of its own on the
pool (:meth:`~mergesearch.search.controller.Controller.run_jobs`), and stores what it
scored through the controller's :meth:`~mergesearch.search.controller.Controller.finish`.

- :class:`.baselines.Baselines`: the source models (the references of a normalized
  objective) and the baselines (uniform average, task arithmetic, a seeding soup), in
  the side study ``<run>.baselines``;
- :class:`.warm_start.WarmStart`: CMA-ES starts from the best baseline;
- :class:`.stages.Stages`: the search itself, once per schedule stage (``<run>.stage<k>``);
- :class:`.refinement.Refinement`: the best candidates refined by gradient descent
  (``<run>.refine``).

The fidelity rungs (:class:`.rungs.Rungs`) are not a phase but a protocol of the loop:
they decide whether a trial's next rung runs or it is pruned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mergesearch.search.controller import Controller


class Phase(Protocol):
    name: str

    def run(self, c: "Controller") -> None: ...


def search_phases() -> list[Phase]:
    from mergesearch.search.phases.baselines import Baselines
    from mergesearch.search.phases.refinement import Refinement
    from mergesearch.search.phases.stages import Stages
    from mergesearch.search.phases.warm_start import WarmStart
    return [Baselines(), WarmStart(), Stages(), Refinement()]
