"""Label-map conventions shared by the phantom, the data pipeline and scoring.

Values follow the original release (see the sample data README): 0 background, 1 disc,
2 vertebral body, 3 spinal cord, 4 CSF, 5 disc protrusion, 6 T2 hyperintensity (inside the
cord), 7 other small structure.
"""

BACKGROUND = 0
DISC = 1
VERTEBRA = 2
CORD = 3
CSF = 4
PROTRUSION = 5
LESION = 6
OTHER = 7

KNOWN_LABELS = frozenset(range(8))

# Labels that make up the cord for ROI construction (a lesion is cord tissue).
CORD_LABELS = (CORD, LESION)
# Training / masking ROI: cord + CSF (+ lesion), dilated once.
TRAIN_ROI_LABELS = (CORD, CSF, LESION)

# Vertebral levels, top-down, and the six scored intervertebral segments.
VERTEBRA_NAMES = ("C2", "C3", "C4", "C5", "C6", "C7", "T1")
SEGMENT_NAMES = ("C2-3", "C3-4", "C4-5", "C5-6", "C6-7", "C7-T1")

# Per-vertebra instance ids used by the phantom's vertebra map (truth for segment tests):
# C2 -> 2, C3 -> 3, ..., C7 -> 7, T1 -> 8, T2 -> 9 (0 = not a vertebral body).
VERTEBRA_INSTANCE_IDS = {name: i + 2 for i, name in enumerate(VERTEBRA_NAMES + ("T2",))}
