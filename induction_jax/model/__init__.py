"""The Flax transformer families (model), their attention kernels (attention) and next-token cross-entropy
(crossentropy)."""
