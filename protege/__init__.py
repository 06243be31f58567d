"""Protégé: teacher-guided RL post-training on Ray.

Subpackages live at the top of the repository (cluster/, actors/, learners/, rewards/, serve/)
and install as protege.cluster, protege.actors, ... Nothing heavy is imported here.
"""

__version__ = "0.1.0"
