"""Tasks: what a family is trained on and how a trained run is used (see tasks/base.py).
Which task a config has is the composition root's business (`registry.task_for`)."""
from transduce.tasks.base import InitCodecs, Task
from transduce.tasks.encoder import ClassifyTask, EncoderTask, MLMTask, TagTask
from transduce.tasks.seq2seq import DenoiseTask, MultitaskTask, Seq2SeqTask

__all__ = ["InitCodecs", "Task", "Seq2SeqTask", "DenoiseTask", "MultitaskTask", "EncoderTask", "ClassifyTask",
           "MLMTask", "TagTask"]
