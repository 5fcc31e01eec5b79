"""The frozen teacher of distillation (config.distill; OpenCLIP's --distill-model).

A teacher is any contrastive model clip_jax can load: a training workdir, or a
zoo architecture with converted or released weights ("ViT-L-14:/weights/dir").
It runs in inference mode, optionally in bfloat16 (parameters stored and
computed so), on the training mesh under the run's sharding rules, in a jitted
program of its own before each train step: its unit embeddings of the global
batch enter the step as batch["teacher_image"] and batch["teacher_text"]
[B, E_teacher], so GradCache's micro-batches split them like the images, the
teacher runs once per global batch, and its activations are freed before the
student's step allocates its own.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from etils import epath

from clip_jax import image_ops, objectives, phases, pretrained, run_config, sharding
from clip_jax.models import zoo

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Teacher:
    model: object  # a clip_jax.models.CLIP
    variables: dict  # placed on the training mesh
    logit_scale: float  # its learned temperature, the scale of its logits in the loss
    embed_dim: int
    _embed: Callable  # jitted (variables, images, tokens) -> (image, text)

    def embed(self, batch):
        """`batch` with the teacher's unit embeddings (float32 [B, E_teacher]) of its
        images and captions as "teacher_image" and "teacher_text"."""
        image, text = self._embed(self.variables, batch["images"], batch["tokens"])
        return {**batch, "teacher_image": image, "teacher_text": text}


def teacher_source(spec):
    """(run config, weights path) of config.distill.teacher `spec`: a training
    workdir, or ARCHITECTURE:WEIGHTS with ARCHITECTURE a zoo name and WEIGHTS a
    clip_jax.convert directory or a PyTorch/safetensors file."""
    name, separator, weights = spec.partition(":")
    if separator and name in zoo.MODEL_NAMES:
        if not epath.Path(weights).exists():
            raise ValueError(f"config.distill.teacher={spec!r}: {weights} does not exist")
        return pretrained.released_config(name), weights
    try:
        return run_config.read(spec), spec
    except ValueError:
        raise ValueError(f"config.distill.teacher={spec!r} is neither a training workdir nor "
                         f"ARCHITECTURE:WEIGHTS with a zoo architecture (e.g. "
                         f"ViT-L-14:/weights/ViT-L-14)") from None


def _check_fits(spec, teacher_model, student_config):
    """One-line errors for a teacher that cannot read the student's batches."""
    if teacher_model.text.vocab_size != student_config.model.text.vocab_size:
        raise ValueError(f"config.distill.teacher={spec!r}: its vocabulary "
                         f"({teacher_model.text.vocab_size} tokens) is not the student's "
                         f"({student_config.model.text.vocab_size})")
    run_phases = phases.parse(student_config.phases, student_config.total_steps,
                              student_config.model)
    longest = max(phase.context_length for phase in run_phases)
    if longest > teacher_model.text.context_length:
        raise ValueError(f"config.distill.teacher={spec!r}: captions of {longest} tokens exceed "
                         f"its context length {teacher_model.text.context_length}")
    sizes = {phase.image_size for phase in run_phases}
    if teacher_model.image.kind != "vit" and sizes != {teacher_model.image.image_size}:
        raise ValueError(f"config.distill.teacher={spec!r}: its ResNet takes "
                         f"{teacher_model.image.image_size} px images only; the run trains at "
                         f"{', '.join(map(str, sorted(sizes)))} px")


def load(config, mesh):
    """The Teacher of the run config `config` (config.distill.teacher set), its
    variables placed on `mesh` by the teacher's sharding rules."""
    distill = config.distill
    teacher_config, weights = teacher_source(distill.teacher)
    if not objectives.get(teacher_config.objective).text_embeddings:
        raise ValueError(f"config.distill.teacher={distill.teacher!r} was trained with "
                         f"config.objective={teacher_config.objective!r}; a teacher needs "
                         f"image and text embeddings (contrastive)")
    with teacher_config.unlocked():
        teacher_config.model.dtype = distill.dtype
    _check_fits(distill.teacher, teacher_config.model, config)
    model, mesh, variables, shardings = pretrained.load_model(teacher_config, weights, mesh)
    dtype = jnp.dtype(distill.dtype)
    if dtype != jnp.float32:  # stored in the compute dtype: half the bytes in bfloat16
        variables = jax.jit(lambda v: jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, v),
            out_shardings=shardings)(variables)
    logit_scale = float(model.apply(variables, method=model.temperature_scale))

    def embed(variables, images, tokens):
        image, text = model.apply(variables, image_ops.normalize(images), tokens,
                                  method=model.embed)
        return image.astype(jnp.float32), text.astype(jnp.float32)

    batch = sharding.batch_sharding(mesh)
    embed = jax.jit(sharding.with_activation_sharding(embed, mesh, teacher_config.sharding_rules),
                    out_shardings=(batch, batch))
    return Teacher(model=model, variables=variables, logit_scale=logit_scale,
                   embed_dim=teacher_config.model.embed_dim, _embed=embed)
