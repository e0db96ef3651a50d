"""Test-time label shift: target distributions (:mod:`~balpoe.shift.distributions`,
:mod:`~balpoe.shift.targets`), label-shift estimators (:mod:`~balpoe.shift.estimators`), the tau
selector and its registry of adaptation modes (:mod:`~balpoe.shift.selector`), metrics on cached
logits (:mod:`~balpoe.shift.scoring`), reports (:mod:`~balpoe.shift.render`) and the
``balpoe eval --test-dists/--prior/--adapt`` driver (:mod:`~balpoe.shift.build`)."""
