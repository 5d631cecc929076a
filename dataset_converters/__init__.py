"""Console scripts that write nnU-Net raw datasets: the ACDC and M&Ms-1/2 converters and the
phantom generator (the phantoms themselves are ``nnunet_sddm.data.phantoms``)."""
