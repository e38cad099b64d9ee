"""SLAM data formats without torch or fairseq: manifests, features, atomic writes, file names.

Used by the manifest scripts (``manifests/``) and by the plugin (``slam_fairseq``) alike, so that both
agree on every column and file name; importing it never imports torch or fairseq.
"""
