"""Ray adapter, driver side: :class:`RayRefit` joins a trainer actor and engine actors with one
transport and pushes with one call.

    trainer = Trainer.remote()                          # mixes in RefitTrainerActor
    engines = {"a": Engine.remote(), "b": Engine.remote()}   # RefitReceiverActor / RefitVllmActor
    with RayRefit(trainer, engines) as refit:           # transport and addresses chosen here
        print(refit.push())                             # every side's report

What it does: asks every actor where it runs (:mod:`refit.adapters.ray_place`), picks the
transport (``cuda_ipc`` for receivers on the trainer's GPU, ``nccl`` when every side has a GPU,
else ``zmq``; or the one named) and the addresses (loopback on one node, each side's Ray node
IP across nodes; ports are always picked free), makes every engine join as a receiver and the
trainer connect to them. A push starts every receiver's ``refit_receive`` and the trainer's
``refit_push`` together and waits for all, each wait bounded: an actor that dies ends the push
at once with a :class:`~refit.errors.TransportError` naming it and the phase, and the group is
torn down (the other engines: the trainer's abort reaches them within ``timeout``, and an engine
that had applied a bucket is marked torn, refusing ``check_serving()`` until a complete push
lands). Rejected: a Ray collective group (it would need every engine's workers in one Ray
group and would move the bytes outside refit's strict protocol).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from refit.adapters.ray_actors import RefitReceiverActor, RefitTrainerActor, RefitVllmActor
from refit.adapters.ray_place import Place, choose_bind, choose_transport, side_options
from refit.errors import PlanError, RefitError, ResolveError, TornStateError, TransportError, WireError
from refit.options import check_timeout
from refit.report import RefitReport

__all__ = ["RayPushReport", "RayRefit", "RefitReceiverActor", "RefitTrainerActor", "RefitVllmActor"]

TRAINER = "trainer"
GRACE = 10.0  # seconds the engines get to end a push after the trainer failed it
_KINDS: dict[str, type[RefitError]] = {k.__name__: k for k in (RefitError, WireError, PlanError, TornStateError, TransportError)}


@dataclass(frozen=True)
class RayPushReport:
    """One push: the trainer's report and each engine actor's receivers' reports."""

    trainer: RefitReport
    engines: dict[str, list[RefitReport]] = field(default_factory=dict)

    @property
    def version(self) -> int:
        """The push's version (the trainer's report's)."""
        return self.trainer.version

    def __str__(self) -> str:
        lines = [self.trainer.summary()]
        for name, reports in self.engines.items():
            lines += [f"  {name}: {r.summary()}" for r in reports]
        return "\n".join(lines)


class RayRefit:
    """A trainer actor joined to engine actors by one refit transport, set up through Ray.

    Args:
        trainer: a Ray actor whose class mixes in :class:`RefitTrainerActor`.
        engines: engine actors (mixing in :class:`RefitReceiverActor` or
            :class:`RefitVllmActor`): a dict name -> actor, or a list (named ``engine-0``, ...).
        transport: ``"auto"`` (default), ``"zmq"``, ``"nccl"`` (gloo on CPU) or ``"cuda_ipc"``.
        bind: ``"auto"`` (loopback when every engine is on the trainer's node, else each side's
            Ray node IP), ``"loopback"`` or ``"node"`` (each side binds its Ray node IP).
            Ports are always free ones picked at bind time.
        timeout: seconds any single wait may take: an actor's answer while setting up, and
            inside a push every wait of the transport (a verdict, an ack, a broadcast).
        push_timeout: seconds one whole push may take, as seen from the driver.
        start_timeout: seconds the actors may take to answer where they run (their start-up,
            which may include loading an engine, counts).
        receiver_options: more options for every receiver (e.g. ``device="cuda"``).
        **options: for the trainer's ``Refitter`` (``bucket_bytes``, ``num_buffers``,
            ``backend`` for nccl, ``auth``, ...).

    Raises:
        RefitError: an invalid argument, or an actor without the refit mix-in.
        TransportError: an actor died or did not answer while setting up (naming it and the
            phase), or the placement cannot carry the transport or bind asked for.
    """

    def __init__(
        self,
        trainer: Any,
        engines: Mapping[str, Any] | Sequence[Any],
        *,
        transport: str = "auto",
        bind: str = "auto",
        timeout: float = 60.0,
        push_timeout: float = 600.0,
        start_timeout: float = 300.0,
        receiver_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        import ray

        self.timeout = float(check_timeout(timeout, "timeout"))  # type: ignore[arg-type]
        self.push_timeout = float(check_timeout(push_timeout, "push_timeout"))  # type: ignore[arg-type]
        start_timeout = float(check_timeout(start_timeout, "start_timeout"))  # type: ignore[arg-type]
        if not isinstance(engines, Mapping):
            if isinstance(engines, str | bytes) or not isinstance(engines, Sequence):
                raise RefitError(f"engines must be a dict name -> actor or a list of actors, got {type(engines).__name__}")
            engines = {f"engine-{i}": e for i, e in enumerate(engines)}
        if not engines:
            raise RefitError("engines is empty: pass at least one engine actor")
        for name, actor in {TRAINER: trainer, **engines}.items():
            if not isinstance(name, str) or not name or (name == TRAINER and actor is not trainer):
                raise RefitError(f"engine names must be non-empty strings other than {TRAINER!r}, got {name!r:.80}")
            if not isinstance(actor, ray.actor.ActorHandle):
                raise RefitError(f"{_who(name)} must be a Ray actor handle (SomeClass.remote(...)), got {type(actor).__name__}")
        if len(set(engines.values())) != len(engines) or trainer in engines.values():
            raise RefitError("each engine actor may appear once, and the trainer actor not among them: pass distinct actors")
        self.trainer, self.engines = trainer, dict(engines)
        self.closed_because = ""
        self._failed_at = 0.0
        self._closing: list[Any] = []
        self._addresses: dict[str, str] = {}  # receiver address -> engine name (error messages)
        #: each engine actor's receivers' ``info()`` (their addresses), once joined
        self.infos: dict[str, list[dict[str, Any]]] = {}
        places = self._ask({TRAINER: trainer, **self.engines}, "refit_place", (), "place", start_timeout)
        where = {name: [Place.from_wire(p, _who(name)) for p in r["places"]] for name, r in places.items()}
        mine = where.pop(TRAINER)[0]
        self.transport = choose_transport(transport, mine, where)
        self.bind = choose_bind(bind, mine, where)
        self.places = {TRAINER: [mine], **where}
        try:

            def receiver(name: str) -> tuple[str, dict[str, Any], str]:
                binds = side_options(self.transport, self.bind, where[name][0].node_ip, sender=False)
                return self.transport, {**binds, **dict(receiver_options or {})}, name

            opened = self._ask(self.engines, "refit_open", receiver, "open")
            self.infos = {name: list(opened[name]["infos"]) for name in self.engines}
            infos = [i for name in self.engines for i in self.infos[name]]
            self._addresses.update({i["address"]: name for name in self.engines for i in self.infos[name]})
            sender = {"timeout": self.timeout, **side_options(self.transport, self.bind, mine.node_ip, sender=True), **options}
            self._ask({TRAINER: trainer}, "refit_connect", (self.transport, infos, sender), "connect")
        except BaseException:
            self.close()
            raise

    # -- the remote calls, every one bounded

    def _ask(self, actors: Mapping[str, Any], method: str, args: Any, phase: str, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Call ``method`` on every actor at once; their replies, or the first refit error."""
        refs = {}
        for name, actor in actors.items():
            try:
                call = getattr(actor, method)
            except AttributeError:
                mixin = "RefitTrainerActor" if name == TRAINER else "RefitReceiverActor or RefitVllmActor"
                raise RefitError(f"{_who(name)} has no {method}(): mix refit.adapters.ray.{mixin} into its class") from None
            refs[name] = call.remote(*(args(name) if callable(args) else args))
        return self._gather(refs, time.monotonic() + (timeout or self.timeout), phase)

    def _gather(self, refs: Mapping[str, Any], deadline: float, phase: str) -> dict[str, dict[str, Any]]:
        """Wait for every ref until ``deadline``; a dead actor, a timeout or a refit error
        reply raises at once."""
        import ray

        names = {ref: name for name, ref in refs.items()}
        pending, out = list(refs.values()), {}
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, left))
            if not ready:
                late = sorted(names[r] for r in pending)
                raise TransportError(f"{', '.join(_who(n) for n in late)} did not answer in time (phase {phase}); is it hung, or still starting?")
            name = names[ready[0]]
            out[name] = reply = self._result(ready[0], name, phase)
            if "error" in reply:
                raise self._error(reply, name, phase)
        return out

    def _result(self, ref: Any, name: str, phase: str) -> dict[str, Any]:
        import ray

        try:
            reply = ray.get(ref, timeout=self.timeout)
        except ray.exceptions.RayActorError as exc:
            self._teardown(f"{_who(name)} died (phase {phase})")
            raise TransportError(
                f"{_who(name)} died during phase {phase}: {_first_line(exc)}; the group was torn down{self._fate(name, phase)}"
            ) from None
        except ray.exceptions.GetTimeoutError:
            raise TransportError(f"{_who(name)} did not answer within {self.timeout} s (phase {phase})") from None
        except ray.exceptions.RayError as exc:
            raise TransportError(f"{_who(name)} failed in phase {phase}: {_first_line(exc)}") from None
        if not isinstance(reply, dict):
            what = type(reply).__name__
            raise TransportError(f"{_who(name)} answered phase {phase} with {what}, not a refit reply; is its refit mix-in overridden?")
        return reply

    def _error(self, reply: dict[str, Any], name: str, phase: str) -> RefitError:
        e = reply["error"]
        message = self._named(f"{_who(name)}, phase {phase}: {e['message']}")
        if e["kind"] == "ResolveError":
            return ResolveError(message, [self._named(p) for p in e["problems"]])
        return _KINDS.get(e["kind"], TransportError)(message)

    def _named(self, text: str) -> str:
        """``text`` with every receiver address followed by its engine actor's name."""
        if not self._addresses:
            return text
        pattern = "|".join(re.escape(a) for a in sorted(self._addresses, key=len, reverse=True))
        return re.sub(pattern, lambda m: f"{m.group(0)} (engine actor {self._addresses[m.group(0)]!r})", text)

    def _fate(self, dead: str, phase: str) -> str:
        others = sorted(set(self.engines) - {dead})
        if phase == "start":
            return "; nothing was sent: every other engine is untouched"
        if dead == TRAINER or not others:
            return ""
        return (
            f"; the other engine actor(s) {others} get the trainer's abort within {self.timeout} s: one that had applied a bucket "
            "is marked torn and refuses check_serving() until a complete push lands, the others are untouched (each actor's refit_status() tells)"
        )

    # -- pushes

    def push(self, version: int | None = None) -> RayPushReport:
        """Push the trainer's :meth:`~RefitTrainerActor.refit_state` to every engine.

        Args:
            version: the version to commit (default: the trainer's numbering).

        Returns:
            Every side's report.

        Raises:
            ResolveError: an engine refused (nothing was loaded anywhere).
            TransportError: an actor died (naming it and the phase; the group is torn down),
                or a side did not answer in time, or the stream broke.
            RefitError: the group was closed.
        """
        self._check_open()
        self._ask(self.engines, "refit_status", (), "start")  # a dead engine is named before anything is sent
        deadline = time.monotonic() + self.push_timeout
        refs = {name: actor.refit_receive.remote(self.timeout) for name, actor in self.engines.items()}
        refs[TRAINER] = self.trainer.refit_push.remote(version)
        got = self._settle(refs, deadline)
        failed = [n for n in (TRAINER, *self.engines) if n in got and "error" in got[n]]  # the trainer's error tells the most
        if failed:
            raise self._error(got[failed[0]], failed[0], "push")
        if len(got) < len(refs):
            late = sorted(set(refs) - set(got))
            raise TransportError(f"{', '.join(_who(n) for n in late)} did not end the push in time (phase push); is it hung?")
        from refit.wire import report_from_wire

        trainer = report_from_wire(got[TRAINER]["report"])
        engines = {n: [report_from_wire(r) for r in got[n]["reports"]] for n in self.engines}
        trainer.receivers = [r for rs in engines.values() for r in rs]
        return RayPushReport(trainer, engines)

    def _settle(self, refs: Mapping[str, Any], deadline: float) -> dict[str, dict[str, Any]]:
        """Every side's reply to one push. A dead actor raises at once; once the trainer has
        failed, the engines get ``GRACE`` s more to end (its abort reaches them at once), so a
        hung engine cannot hold the push until ``push_timeout``."""
        import ray

        names = {ref: name for name, ref in refs.items()}
        pending = list(refs.values())
        got: dict[str, dict[str, Any]] = {}
        while pending:
            if TRAINER in got and "error" in got[TRAINER]:
                deadline = min(deadline, self._failed_at + min(GRACE, self.timeout))
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if TRAINER in got:
                    return got  # the trainer's report or error says what happened
                late = sorted(names[r] for r in pending)
                who = ", ".join(_who(n) for n in late)
                raise TransportError(f"{who} did not end the push within push_timeout={self.push_timeout} s (phase push)")
            name = names[ready[0]]
            got[name] = self._result(ready[0], name, "push")
            if name == TRAINER:
                self._failed_at = time.monotonic()
        return got

    def status(self) -> dict[str, list[dict[str, Any]]]:
        """Each engine actor's receivers: committed ``version``, ``torn`` flag, ``last_error``.

        Raises:
            TransportError: an actor died or did not answer within ``timeout``.
        """
        self._check_open()
        got = self._ask(self.engines, "refit_status", (), "status")
        return {name: r["status"] for name, r in got.items()}

    def _check_open(self) -> None:
        if self.closed_because:
            raise RefitError(f"this RayRefit was closed ({self.closed_because}); build a new one with the live actors")

    # -- teardown

    def _teardown(self, why: str) -> None:
        """Tell every actor to leave the transport, without waiting (a dead or busy one would
        hold the caller); :meth:`close` waits, bounded."""
        if self.closed_because:
            return
        self.closed_because = why
        for name, actor in {TRAINER: self.trainer, **self.engines}.items():
            method = "refit_disconnect" if name == TRAINER else "refit_close"
            try:
                self._closing.append(getattr(actor, method).remote())
            except Exception:  # a handle of a dead actor: nothing to close there
                continue

    def close(self, timeout: float | None = None) -> None:
        """Close the receivers and the trainer's sender, waiting at most ``timeout`` s
        (default: the group's ``timeout``) for actors that are busy; dead actors are skipped."""
        import ray

        self._teardown(self.closed_because or "closed")
        closing, self._closing = self._closing, []
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=self.timeout if timeout is None else timeout)

    def __enter__(self) -> RayRefit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _who(name: str) -> str:
    return "trainer actor" if name == TRAINER else f"engine actor {name!r}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
