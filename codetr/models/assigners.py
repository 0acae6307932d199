"""Assigners and samplers: which prediction learns from which ground truth.

- HungarianMatcher: one-to-one matching of DETR queries (scipy linear_sum_assignment).
- ATSSAssigner, MaxIoUAssigner, RandomSampler: one-to-many assignment of the auxiliary heads.
"""

# ---- one-to-one: Hungarian matcher -------------------------------------------------------

# ---- one-to-many: ATSS, max-IoU, random sampler ------------------------------------------
