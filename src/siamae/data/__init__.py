"""Data sources (image folders, videos, synthetic scenes) and view makers; workers return uint8."""
