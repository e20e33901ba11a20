"""ttt.models"""
