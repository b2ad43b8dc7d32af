"""attnkit"""
