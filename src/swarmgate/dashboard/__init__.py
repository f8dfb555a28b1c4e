"""The web dashboard: developer portal, provider portal and public network status."""
