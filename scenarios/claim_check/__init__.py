"""The Suzhou commercial medical-insurance fast-claim scenario."""
