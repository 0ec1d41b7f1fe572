"""Test-side helpers shared by every test folder: real peer processes and their cleanup."""
