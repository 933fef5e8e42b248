"""The replica stage: the Ray actor that holds one model replica (actor.py) turns prepared chunks into
requests (requests.py), has its engine generate them and writes each chunk's part; what it does when its
process hangs or keeps dying is in faults.py. Imports no torch: the engine it loads does.
"""
