"""ttt.train"""
