"""Small helpers shared by every stage: content hashing, the feature cache, progress bars."""
