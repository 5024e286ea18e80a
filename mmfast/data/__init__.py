"""Data files shipped with mmfast: ``av_digits.npz`` (AV-Digits, see ``AV_DIGITS.md``); load with
:func:`mmfast.load_av_digits`."""
