"""What every chat front end shares: reply texts, button codes, requests, progress, delivery."""
