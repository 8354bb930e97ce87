"""Status callbacks: delivery rows per status change (service), their signed HTTP delivery, and URL checks."""
