"""One-by-One Distillation of each uploaded small model into the FM's global and personal heads."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common.algorithms.abstention import Threshold
from common.algorithms.losses import adam, column_index, kd_loss
from common.algorithms.stats import StatsBank
from common.algorithms.transfer import Synthesised, invert_teacher, synthetic_stats
from common.config import OBODConfig
from common.package import KnowledgePackage
from common.zoo import SmallModel, parse_spec


@dataclass
class Head:
    """An FM knowledge head (G or P_c): a model over FM features and the label of each output column."""

    model: SmallModel
    labels: list[str]
    abstention: Threshold | None = None  # calibrated for this model's weights only (None: never abstain)

    def copy(self) -> Head:
        """A copy to train further: without the threshold, which belongs to these weights."""
        return Head(copy.deepcopy(self.model), list(self.labels))


@dataclass
class Teacher:
    """An uploaded small model with its label names (its output columns) and per-label training counts."""

    model: SmallModel
    labels: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_package(cls, pkg: KnowledgePackage, device: str | torch.device = "cpu") -> Teacher:
        return cls(pkg.build().to(device), list(pkg.labels), dict(zip(pkg.labels, pkg.counts, strict=False)))


class Cancelled(Exception):
    """The caller asked the job to stop (e.g. server shutdown); nothing it computed is to be used."""


@dataclass
class JobOutcome:
    global_head: Head
    personal_head: Head
    bank: StatsBank


def run_job(
    global_head: Head | None,
    bank: StatsBank,
    teacher: Teacher,
    teacher_stats: StatsBank | None,
    public: torch.Tensor,
    cfg: OBODConfig,
    seed: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> JobOutcome:
    """One OBOD job (DESIGN §3.2 steps 1-4): merge the upload's statistics, update G, personalise P_c.

    Inputs are not modified; the server persists the outcome atomically, the benchmark keeps it in memory.
    """
    step = global_step(global_head, bank, teacher, teacher_stats, public, cfg, seed, cancel)
    personal = personalise(step.global_head, teacher, public, step.bank, cfg, seed, cancel, step.synth)
    return JobOutcome(step.global_head, personal, step.bank)


@dataclass
class GlobalStep:
    global_head: Head
    bank: StatsBank  # the server's bank with this upload merged in
    synth: Synthesised  # the teacher's inverted features (deterministic in the seed: `synthesise` again)


def global_step(
    global_head: Head | None,
    bank: StatsBank,
    teacher: Teacher,
    teacher_stats: StatsBank | None,
    public: torch.Tensor,
    cfg: OBODConfig,
    seed: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> GlobalStep:
    """Steps 1-3 of a job, the part that must run one upload at a time: merge, invert, update G.

    Personalising (`personalise`) needs only its result, so a server may run it beside the next
    upload's global step.
    """
    merged = merged_bank(bank, teacher_stats)
    synth = synthesise(teacher, undescribed_labels(teacher, teacher_stats), public, cfg, seed)
    if cfg.synth_stats:
        merged.merge_bank(synthetic_stats(synth, teacher.counts, set(synth.labels), cfg.synth_rank))
    new_global = distill_global(global_head, teacher, public, merged, cfg, seed, cancel, synth)
    return GlobalStep(new_global, merged, synth)


def merged_bank(bank: StatsBank, upload: StatsBank | None) -> StatsBank:
    """A new bank: the server's, with the upload's statistics merged in by count."""
    merged = StatsBank(bank.dim)
    merged.merge_bank(bank)
    if upload is not None:
        merged.merge_bank(upload)
    return merged


def undescribed_labels(teacher: Teacher, upload_stats: StatsBank | None) -> list[str]:
    """The teacher's labels that this upload brings examples of but no statistics for.

    Only these get inverted features. Where the upload's statistics describe a label they label its
    pseudo-features exactly, and a teacher's soft labels there only add noise (CLINC150 val: KD on bank
    pseudo-features cost 1.3 points, KD on inverted features 0.6). Labels without a count in this upload
    were learnt in earlier tasks and reached the server then; inverting only the new evidence keeps a
    job's cost proportional to its task, not to everything the client has learnt.
    """
    described = set(upload_stats.labels()) if upload_stats is not None else set()
    evidenced = [y for y in teacher.labels if not teacher.counts or teacher.counts.get(y, 0) > 0]
    return [y for y in evidenced if y not in described]


def synthesise(
    teacher: Teacher, labels: list[str], public: torch.Tensor, cfg: OBODConfig, seed: int
) -> Synthesised:
    """The teacher's inverted features for `labels` (none when cfg.synth_per_label is 0)."""
    gen = torch.Generator().manual_seed(seed + 7)
    return invert_teacher(
        teacher.model,
        teacher.labels,
        labels,
        public,
        cfg.synth_per_label,
        cfg.synth_steps,
        cfg.synth_lr,
        gen,
        cfg.synth_confidence,
    )


def distill_global(
    head: Head | None,
    teacher: Teacher,
    public: torch.Tensor,
    bank: StatsBank,
    cfg: OBODConfig,
    seed: int = 0,
    cancel: Callable[[], bool] | None = None,
    synth: Synthesised | None = None,
) -> Head:
    """G ← one OBOD step with `teacher`: KD on the transfer inputs, anchor on other labels, bank CE."""
    if head is None:
        model = SmallModel(parse_spec(cfg.head_spec), public.shape[1], len(teacher.labels))
        head = Head(model, [])
    new = head.copy()
    known = set(head.labels)
    new.labels += [y for y in teacher.labels if y not in known]
    new.model.grow(len(new.labels))
    _fit(new, head, teacher, public, bank, bank.labels(), cfg, cfg.epochs, seed, cancel, synth)
    return new


def personalise(
    global_head: Head,
    teacher: Teacher,
    public: torch.Tensor,
    bank: StatsBank,
    cfg: OBODConfig,
    seed: int = 0,
    cancel: Callable[[], bool] | None = None,
    synth: Synthesised | None = None,
) -> Head:
    """P_c ← the new G, fitted further to client c's teacher (anchored to G on the other labels)."""
    personal = global_head.copy()
    if cfg.personal_epochs > 0:
        _fit(
            personal,
            global_head,
            teacher,
            public,
            bank,
            bank.labels(),
            cfg,
            cfg.personal_epochs,
            seed + 1,
            cancel,
            synth,
        )
    return personal


def _fit(
    student: Head,
    anchor: Head,
    teacher: Teacher,
    public: torch.Tensor,
    bank: StatsBank,
    proto_labels: list[str],
    cfg: OBODConfig,
    epochs: int,
    seed: int,
    cancel: Callable[[], bool] | None = None,
    synth: Synthesised | None = None,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    device = next(student.model.parameters()).device
    teacher_cols = column_index(student.labels, teacher.labels).to(device)
    taught = set(teacher.labels)
    kept = [y for y in anchor.labels if y not in taught]
    kept_student, kept_anchor = (
        column_index(student.labels, kept).to(device),
        column_index(anchor.labels, kept),
    )
    student_labels = set(student.labels)
    proto_labels = [y for y in proto_labels if y in student_labels]
    sampler = bank.sampler(proto_labels) if proto_labels else None
    proto_cols = column_index(student.labels, proto_labels)

    with torch.no_grad():
        u = public.to(device)
        # the teacher's logits on the public corpus are only needed for KD there
        teacher_logits = _batched(teacher.model.eval(), u) if cfg.kd_public > 0 else u[:, :0]
        anchor_logits = _batched(anchor.model.eval(), u)[:, kept_anchor.to(device)] if kept else None
        s_x = synth.features.to(device) if synth is not None and cfg.kd_synth > 0 else u[:0]
        s_logits = _batched(teacher.model.eval(), s_x) if len(s_x) else s_x[:, :0]

    def kd(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        student_taught = student_logits[:, teacher_cols]
        if cfg.kd_standardize:
            target, student_taught = _zscore(target), _zscore(student_taught)
        return kd_loss(target, student_taught, cfg.temperature)

    opt = adam(student.model.parameters(), cfg.lr)
    student.model.train()
    # a small public corpus must not mean a handful of optimizer steps: train for at least min_steps
    steps = max(cfg.min_steps, epochs * max(1, (len(u) + cfg.batch_size - 1) // cfg.batch_size))
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if cancel is not None and cancel():
            raise Cancelled("distillation cancelled")
        if len(order) < cfg.batch_size:
            order = torch.cat([order, torch.randperm(len(u), generator=gen)])
        idx, order = order[: cfg.batch_size].to(device), order[cfg.batch_size :]
        loss = torch.zeros((), device=device)
        use_anchor = anchor_logits is not None and cfg.lambda_anchor > 0
        # one forward of the public batch serves both terms that read it
        public_logits = student.model(u[idx]) if cfg.kd_public > 0 or use_anchor else None
        if public_logits is not None and cfg.kd_public > 0:
            loss = loss + cfg.lambda_kd * cfg.kd_public * kd(public_logits, teacher_logits[idx])
        if public_logits is not None and anchor_logits is not None and use_anchor:
            loss = loss + cfg.lambda_anchor * F.mse_loss(public_logits[:, kept_student], anchor_logits[idx])
        if len(s_x):
            pick = torch.randint(len(s_x), (cfg.batch_size,), generator=gen).to(device)
            loss = loss + cfg.lambda_kd * cfg.kd_synth * kd(student.model(s_x[pick]), s_logits[pick])
        if sampler is not None and cfg.lambda_proto > 0:
            which = torch.randint(len(proto_labels), (cfg.proto_batch,), generator=gen)
            feats = sampler.draw(which, gen).to(device)
            target = proto_cols[which].to(device)
            loss = loss + cfg.lambda_proto * F.cross_entropy(student.model(feats), target)
        if not loss.requires_grad:
            break  # no term applies to this job (e.g. nothing to distil and no statistics): G stays as is
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.model.eval()


def _zscore(logits: torch.Tensor) -> torch.Tensor:
    """Per-row standardised logits: KD then compares rankings, not the scales of different models."""
    centred = logits - logits.mean(dim=1, keepdim=True)
    if logits.shape[1] < 2:  # a teacher of one label: a row has no spread, and std() of one value is NaN
        return centred
    return centred / logits.std(dim=1, keepdim=True).clamp_min(1e-6)


def _batched(model: SmallModel, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
